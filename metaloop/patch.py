"""Stateless modules: run any ``nn.Module`` with substituted fast weights and keep their history.

:func:`monkeypatch` turns a module into a :class:`FunctionalModule` whose forward takes
``params=`` (a list in ``module.parameters()`` order). It is built on
:func:`torch.func.functional_call`: the original module is neither deep-copied nor has its
class rewritten. Buffers (BatchNorm running statistics) are copied into the functional module
and evolve there, leaving the original untouched.

The names and semantics are higher's (``higher.patch``): ``monkeypatch``, ``make_functional``,
``buffer_sync``, and the ``fast_params`` / ``init_fast_params`` / ``parameters(time=)`` /
``update_params`` / ``track_higher_grads`` members of the patched module.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from metaloop.utils import _copy_tensor

__all__ = ["FunctionalModule", "monkeypatch", "make_functional", "buffer_sync"]

Device = torch.device | str | None


def _check_params(names: Sequence[str], reference: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> None:
    if len(params) != len(names):
        raise ValueError(
            f"expected {len(names)} fast weights (one per entry of module.parameters()), got {len(params)}"
        )
    for name, ref, p in zip(names, reference, params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"fast weight for {name!r} must be a Tensor, got {type(p).__name__}")
        if p.shape != ref.shape:
            raise ValueError(
                f"fast weight for {name!r} has shape {tuple(p.shape)}, expected {tuple(ref.shape)}"
            )


# higher's names: the attributes of nn.Module's own machinery, and the base class of patched modules.
_internal_attrs = {
    "_backend", "_parameters", "_buffers", "_backward_hooks", "_forward_hooks",
    "_forward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks", "_modules",
}


class _MonkeyPatchBase(nn.Module):
    """The base class of functional modules (higher's name): ``isinstance(fmodel, _MonkeyPatchBase)`` holds."""


_PATCHED_CLASSES: dict[type, type] = {}


def _patched_class(module_type: type) -> type:
    """Returns ``FunctionalModule`` subclassed with ``module_type`` (cached; never instantiated), or
    ``FunctionalModule`` itself where the two cannot be combined (a metaclass or layout conflict)."""
    cls = _PATCHED_CLASSES.get(module_type)
    if cls is None:
        try:
            cls = type(f"Functional{module_type.__name__}", (FunctionalModule, module_type), {"__module__": __name__})
        except TypeError:
            cls = FunctionalModule
        _PATCHED_CLASSES[module_type] = cls
    return cls


class FunctionalModule(_MonkeyPatchBase):
    """A stateless view of ``module`` that runs its forward with fast weights.

    Calling ``fmodel(*args, params=None, **kwargs)`` runs ``module.forward`` with ``params``
    (a list in ``module.parameters()`` order) or, if omitted, the latest fast weights. As in
    higher, passing ``params`` also records them as the latest fast weights. Submodules are
    reachable as attributes (``fmodel.encoder(x)`` uses the fast weights too), as are the
    module's other methods, which then run with the fast weights substituted.

    Train/eval mode is the functional module's own: ``fmodel.eval()`` does not change the
    original module.
    """

    def __init__(
        self,
        module: nn.Module,
        track_higher_grads: bool = True,
    ) -> None:
        super().__init__()
        # One walk over the module (tied submodules and parameters included) gives the unique
        # parameters in module.parameters() order and, for every name a tensor is reachable
        # under, where its fast version goes: (owner's dict, key, index). This is the tie map
        # functional_call recomputes on each call, resolved once.
        names: list[str] = []
        reference: list[torch.Tensor] = []
        param_index: dict[str, int] = {}
        param_slots: list[tuple[dict, str, int]] = []
        buffer_slots: dict[str, tuple[dict, str]] = {}
        own_buffers: dict[str, torch.Tensor] = {}
        seen: dict[int, int] = {}
        seen_buffers: set[int] = set()
        submodules: list[nn.Module] = []
        seen_modules: set[int] = set()
        for prefix, mod in module.named_modules(remove_duplicate=False):
            if id(mod) not in seen_modules:
                seen_modules.add(id(mod))
                submodules.append(mod)
            dot = f"{prefix}." if prefix else ""
            for attr, p in mod._parameters.items():
                if p is None:
                    continue
                i = seen.get(id(p))
                if i is None:
                    i = seen[id(p)] = len(reference)
                    reference.append(p)
                    names.append(dot + attr)
                param_index[dot + attr] = i
                param_slots.append((mod._parameters, attr, i))
            for attr, b in mod._buffers.items():
                if b is not None:
                    buffer_slots[dot + attr] = (mod._buffers, attr)
                    if id(b) not in seen_buffers:
                        seen_buffers.add(id(b))
                        own_buffers[dot + attr] = b
        # Plain attribute writes: nn.Module.__setattr__ is slow, and one of these is built per task.
        self.__dict__.update(
            _module=module,  # not registered as a submodule: the functional module owns no parameters
            _param_names=names,
            _reference_params=reference,
            _param_index=param_index,
            _param_slots=param_slots,
            _buffer_slots=buffer_slots,
            # Fused attention kernels have no double backward: use the math kernel for modules
            # with attention layers while higher-order gradients are tracked.
            math_attention=any(
                "Attention" in type(m).__name__ or "Transformer" in type(m).__name__ for m in submodules
            ),
            _fmodule_buffers=own_buffers,  # shared with the module until buffer_sync copies them
            _submodules=submodules,
            _modes=[m.training for m in submodules],
            training=module.training,
            _fast_params=None,
            _views={},
        )
        self.track_higher_grads = track_higher_grads

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # noqa: D105
        """A subclass of both FunctionalModule and the wrapped module's type, so that, as in higher,
        ``isinstance(fmodel, type(module))`` holds (``isinstance`` consults ``__class__``). Only
        ``isinstance`` sees it: ``type(fmodel)`` and attribute lookup stay FunctionalModule's."""
        module = self.__dict__.get("_module")
        return FunctionalModule if module is None else _patched_class(type(module))

    # -- fast weights -------------------------------------------------------------------
    @property
    def track_higher_grads(self) -> bool:
        """Whether the history of fast weights (and their graph) is kept."""
        return self._track_higher_grads

    @track_higher_grads.setter
    def track_higher_grads(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"track_higher_grads must be a bool, got {value!r}")
        self.__dict__["_track_higher_grads"] = value

    @property
    def fast_params(self) -> list[torch.Tensor] | None:
        """The latest fast weights, or None before any were given."""
        return None if self._fast_params is None else self._fast_params[-1]

    @fast_params.setter
    def fast_params(self, value: Iterable[torch.Tensor]) -> None:
        self._record(value)

    def _record(self, value: Iterable[torch.Tensor], check: bool = True) -> None:
        value = list(value)
        if check:
            _check_params(self._param_names, self._reference_params, value)
        # Plain attribute writes: nn.Module.__setattr__ is slow, and this runs every step.
        if self._fast_params is None:
            self.__dict__["_fast_params"] = [value]
        elif self._track_higher_grads:
            latest = self._fast_params[-1]
            if len(latest) != len(value) or any(a is not b for a, b in zip(latest, value)):
                self._fast_params.append(value)
        else:
            self.__dict__["_fast_params"] = [value]

    @property
    def init_fast_params(self) -> list[torch.Tensor] | None:
        """The initial fast weights (time 0)."""
        if self._fast_params is None:
            return None
        if not self._track_higher_grads:
            raise RuntimeError(
                "init_fast_params is unavailable with track_higher_grads=False: only the latest "
                "fast weights are kept; use fmodel.fast_params"
            )
        return self._fast_params[0]

    def update_params(self, params: Iterable[torch.Tensor]) -> None:
        """Records ``params`` as the latest fast weights."""
        self._record(params)

    def parameters(self, time: int | None = None, recurse: bool = True) -> Iterator[torch.Tensor]:  # type: ignore[override]
        """Returns an iterator over the fast weights at step ``time`` (default: the latest)."""
        if self._fast_params is None:
            raise ValueError(
                "this functional module holds no fast weights yet: pass params= to its forward "
                "or call update_params"
            )
        if time is None:
            time = -1
        if not self._track_higher_grads and time not in (-1, 0):
            raise ValueError(
                f"parameters(time={time}) is unavailable with track_higher_grads=False: only the "
                "latest fast weights are kept (time=None, -1 or 0)"
            )
        try:
            return iter(self._fast_params[time])
        except IndexError:
            raise ValueError(
                f"parameters(time={time}): only times 0..{len(self._fast_params) - 1} are recorded"
            ) from None

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):  # type: ignore[override]
        """Returns ``(name, fast weight)`` pairs of the latest fast weights."""
        pre = f"{prefix}." if prefix else ""
        return iter([(pre + n, p) for n, p in zip(self._param_names, self.parameters())])

    def buffers(self, recurse: bool = True) -> Iterator[torch.Tensor]:  # type: ignore[override]
        """Returns an iterator over the functional module's own buffers."""
        return iter(self._fmodule_buffers.values())

    def named_buffers(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):  # type: ignore[override]
        """Returns ``(name, buffer)`` pairs of the functional module's own buffers."""
        pre = f"{prefix}." if prefix else ""
        return iter([(pre + n, b) for n, b in self._fmodule_buffers.items()])

    # -- running the module -------------------------------------------------------------
    def train(self, mode: bool = True) -> FunctionalModule:
        """Sets the functional module's own train/eval mode; the original module is untouched."""
        if not isinstance(mode, bool):
            raise ValueError(f"training mode must be a bool, got {mode!r}")
        self.training = mode
        self._modes = [mode] * len(self._submodules)
        return self

    def _latest(self, params: Sequence[torch.Tensor] | None) -> list[torch.Tensor]:
        if params is not None:
            self._record(params)
        if self._fast_params is None:
            raise ValueError(
                "params= must be given: this functional module does not hold fast weights "
                "(make_functional) and none were recorded yet"
            )
        return self._fast_params[-1]

    def _run(self, fn: Callable[[], Any]) -> Any:
        if self.math_attention and self._track_higher_grads and torch.is_grad_enabled():
            with sdpa_kernel(SDPBackend.MATH):
                return self._run_in_mode(fn)
        return self._run_in_mode(fn)

    def _run_in_mode(self, fn: Callable[[], Any]) -> Any:
        changed = [m for m, mode in zip(self._submodules, self._modes) if m.training != mode]
        if not changed:
            return fn()
        saved = [m.training for m in self._submodules]
        try:
            for m, mode in zip(self._submodules, self._modes):
                m.training = mode
            return fn()
        finally:
            for m, mode in zip(self._submodules, saved):
                m.training = mode

    def forward(self, *args: Any, params: Sequence[torch.Tensor] | None = None, **kwargs: Any) -> Any:
        """Returns ``module(*args, **kwargs)`` computed with the fast weights."""
        return self._call_path("", None, args, kwargs, params)

    def _call_path(self, path: str, attr: str | None, args: tuple, kwargs: dict, params: Sequence[torch.Tensor] | None) -> Any:
        latest = self._latest(params)
        target = self._module.get_submodule(path) if path else self._module
        fn = target if attr is None else getattr(target, attr)
        return self._run(lambda: self._call_swapped(latest, fn, args, kwargs))

    def _call_swapped(self, latest: list[torch.Tensor], fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """Returns ``fn(*args, **kwargs)`` with the fast weights and buffers swapped into the module.

        This is :func:`torch.func.functional_call`'s reparametrization with the slots (and the
        tie map) resolved once at construction instead of on every call.
        """
        buffers = self._fmodule_buffers
        saved_params = [(slots, attr, slots[attr]) for slots, attr, _ in self._param_slots]
        saved_buffers = [(name, *self._buffer_slots[name]) for name in buffers]
        saved_buffers = [(name, slots, attr, slots[attr]) for name, slots, attr in saved_buffers]
        try:
            for slots, attr, i in self._param_slots:
                slots[attr] = latest[i]
            for name, slots, attr, _ in saved_buffers:
                slots[attr] = buffers[name]
            return fn(*args, **kwargs)
        finally:
            for slots, attr, original in saved_params:
                slots[attr] = original
            for name, slots, attr, original in saved_buffers:
                # A module that reassigned a buffer (rather than updating it in place) keeps it.
                buffers[name] = slots[attr]
                slots[attr] = original

    def _lookup(self, path: str, name: str) -> Any:
        """Resolves ``name`` on the submodule at ``path`` with the fast weights substituted."""
        full = f"{path}.{name}" if path else name
        if full in self._param_index and self._fast_params is not None:
            return self._fast_params[-1][self._param_index[full]]
        if full in self._fmodule_buffers:
            return self._fmodule_buffers[full]
        owner = self._module.get_submodule(path) if path else self._module
        value = getattr(owner, name)
        if isinstance(value, nn.Module):
            view = self._views.get(full)
            if view is None:
                view = self._views[full] = _SubmoduleView(self, full)
            return view
        if callable(value) and getattr(value, "__self__", None) is owner:
            return lambda *a, params=None, **kw: self._call_path(path, name, a, kw, params)
        return value

    def _item(self, path: str, key: Any) -> _SubmoduleView:
        """Returns the view of ``container[key]`` for a Sequential/ModuleList/ModuleDict at ``path``."""
        owner = self._module.get_submodule(path) if path else self._module
        child = owner[key]
        if not isinstance(child, nn.Module) or isinstance(key, slice):
            raise TypeError(f"indexing a functional module supports single submodules, not {key!r}")
        name = next(n for n, m in owner.named_children() if m is child)
        return self._lookup(path, name)

    def __getitem__(self, key: Any) -> _SubmoduleView:
        return self._item("", key)

    def __len__(self) -> int:
        return len(self._module)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        if name.startswith("_"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return self._lookup("", name)

    def __repr__(self) -> str:
        steps = 0 if self._fast_params is None else len(self._fast_params)
        return f"FunctionalModule({self._module!r}, history={steps})"


class _SubmoduleView:
    """A submodule of a :class:`FunctionalModule`, run with its parent's fast weights."""

    def __init__(self, root: FunctionalModule, path: str) -> None:
        self._root = root
        self._path = path

    def __call__(self, *args: Any, params: Sequence[torch.Tensor] | None = None, **kwargs: Any) -> Any:
        return self._root._call_path(self._path, None, args, kwargs, params)

    def parameters(self) -> Iterator[torch.Tensor]:
        """Returns the latest fast weights of this submodule, in its ``parameters()`` order."""
        pre = self._path + "."
        latest = self._root.fast_params or []
        return iter([p for n, p in zip(self._root._param_names, latest) if n.startswith(pre)])

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return self._root._lookup(self._path, name)

    def __getitem__(self, key: Any) -> _SubmoduleView:
        return self._root._item(self._path, key)

    def __repr__(self) -> str:
        return f"FunctionalModule view of {self._path!r}"


def buffer_sync(module: nn.Module, fmodule: FunctionalModule, device: Device = None) -> None:
    """Copies ``module``'s buffers into ``fmodule`` (detached clones, cast to ``device``)."""
    if not isinstance(fmodule, FunctionalModule):
        raise TypeError(f"buffer_sync expects a FunctionalModule, got {type(fmodule).__name__}")
    fmodule._fmodule_buffers = {
        name: _copy_tensor(b, safe_copy=True, device=device) for name, b in module.named_buffers()
    }


def make_functional(
    module: nn.Module,
    encapsulator: Callable[[FunctionalModule, nn.Module], None] | None = None,
) -> FunctionalModule:
    """Returns a stateless version of ``module`` holding no fast weights (pass ``params=``).

    Buffers are shared with ``module`` until :func:`buffer_sync` copies them. ``encapsulator``,
    if given, is called as ``encapsulator(fmodule, module)`` to finish the set-up.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"make_functional expects an nn.Module, got {type(module).__name__}")
    fmodule = FunctionalModule(module)
    if encapsulator is not None:
        encapsulator(fmodule, module)
    return fmodule


def monkeypatch(
    module: nn.Module,
    device: Device = None,
    copy_initial_weights: bool = True,
    track_higher_grads: bool = True,
) -> FunctionalModule:
    """Returns a :class:`FunctionalModule` of ``module`` holding initial fast weights and buffers.

    With ``copy_initial_weights=True`` the initial fast weights are detached copies of the
    module's parameters (on ``device`` if given), so no gradient reaches the module. With
    ``False`` they are the module's parameters themselves (moved to ``device`` on the graph),
    so gradients through the unrolled loop reach them, as MAML needs. Buffers are copied.
    """

    def encapsulator(fmodule: FunctionalModule, mod: nn.Module) -> None:
        if copy_initial_weights:
            params = [_copy_tensor(p, safe_copy=True, device=device) for p in mod.parameters()]
        else:
            params = [p if device is None else p.to(device) for p in mod.parameters()]
        buffer_sync(mod, fmodule, device)
        fmodule.update_params(params)

    fmodule = make_functional(module, encapsulator=encapsulator)
    fmodule.track_higher_grads = track_higher_grads
    return fmodule
