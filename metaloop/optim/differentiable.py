"""Differentiable optimizers: higher-compatible stateful shells over the pure rules.

A :class:`DifferentiableOptimizer` branches from a live ``torch.optim`` optimizer: it copies
its param groups, hyperparameters and state (moments, step counts, momentum buffers), so an
unrolled loop continues where real training is. ``step(loss)`` returns new fast weights that
carry a graph back to the old ones and to any hyperparameter given as a tensor.

The shells with higher's names (``DifferentiableSGD``, ``DifferentiableAdam``, ...) are made
from the optimizer table :data:`metaloop.optim.rules.OPTIMIZERS` (``torch.optim`` type ->
rule): one per row, named ``"Differentiable" + type name``. :func:`register_optim` adds a row
(a :class:`~metaloop.optim.rules.Rule`), or, as in higher, a shell class that overrides
``_update(grouped_grads)`` to write new fast weights into ``self.param_groups[g]["params"]``.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from metaloop.optim.hyperparams import Override, merge_override, per_parameter
from metaloop.optim.rules import OPTIMIZERS, Rule, apply_rule
from metaloop.utils import _recursive_map

Device = torch.device | str | None
GradCallback = Callable[[list[Tensor | None]], Sequence[Tensor | None]]  # gradients -> the gradients a step uses
GroupedGrads = list[list[Tensor | None]]  # one list of gradients per param group

_CONSTRUCTOR_ARGS = ("other", "reference_params", "fmodel", "device", "override", "grad_callback", "track_higher_grads")
_STEP_ARGS = ("loss", "params", "override", "grad_callback")


def _import_state_value(key: str, value: Any, scalar_keys: tuple[str, ...], device: Device) -> Any:
    """Returns one entry of a live optimizer's per-parameter state as a rule expects it."""
    if key in scalar_keys:
        number = value.item() if isinstance(value, Tensor) else value
        return int(number) if key == "step" else float(number)
    if isinstance(value, Tensor):
        return value.detach().clone().to(device)
    return value


def _unknown_options(what: str, given: Iterable[str], accepted: Sequence[str]) -> TypeError:
    unknown = ", ".join(repr(k) for k in sorted(given))
    return TypeError(f"{what} got unknown option(s) {unknown}; it accepts {', '.join(accepted)}")


class DifferentiableOptimizer:
    """Base class of differentiable optimizers, with higher's constructor and ``step``.

    Args:
        other: the live ``torch.optim`` optimizer to branch from.
        reference_params: the parameters of the model tracked by ``other``, in
            ``model.parameters()`` order (fast weights are given in this order).
        fmodel: a :class:`~metaloop.patch.FunctionalModule` whose fast weights ``step``
            reads when ``params`` is not given, and updates.
        device: where to put the copied optimizer state.
        override: hyperparameter overrides (see :mod:`metaloop.optim.hyperparams`).
        grad_callback: ``f(grads) -> grads`` applied to the gradients, in reference order.
        track_higher_grads: if False, the loop runs without a graph (test mode): memory
            stays flat however many steps are taken.
        **options: the rule's own options (:attr:`Rule.options`, e.g. Rprop's ``smooth_sign``),
            written into every param group.

    Raises:
        TypeError: for an option the rule does not read (naming it and the accepted ones).
        ValueError: for hyperparameters the rule cannot use (:attr:`Rule.check`).
    """

    rule: ClassVar[Rule | None] = None

    def __init__(
        self,
        other: torch.optim.Optimizer,
        reference_params: Iterable[Tensor],
        fmodel: Any = None,
        device: Device = None,
        override: Override | None = None,
        grad_callback: GradCallback | None = None,
        track_higher_grads: bool = True,
        **options: Any,
    ) -> None:
        if not isinstance(other, torch.optim.Optimizer):
            raise TypeError(f"expected a torch.optim.Optimizer to branch from, got {type(other).__name__}")
        accepted = self.rule.options if self.rule is not None else ()
        unknown = [k for k in options if k not in accepted]
        if unknown:
            raise _unknown_options(type(self).__name__, unknown, (*_CONSTRUCTOR_ARGS, *accepted))
        reference = list(reference_params)
        position = {id(p): i for i, p in enumerate(reference)}
        scalar_keys = self.rule.scalar_state if self.rule is not None else ("step",)
        self.param_groups: list[dict[str, Any]] = []
        self.state: list[list[dict[str, Any]]] = []
        self._group_to_param_list: list[list[int]] = []
        for group in other.param_groups:
            indices = []
            for p in group["params"]:
                if id(p) not in position:
                    raise ValueError(
                        f"the optimizer tracks a parameter of shape {tuple(p.shape)} that is not among "
                        f"reference_params ({len(reference)} tensors); pass the parameters of the "
                        "module the optimizer was built on"
                    )
                indices.append(position[id(p)])
            self._group_to_param_list.append(indices)
            hparams = {k: v for k, v in group.items() if k != "params"}
            hparams.update(options)
            self.param_groups.append({**hparams, "params": [reference[i] for i in indices]})
            self.state.append([
                {k: _import_state_value(k, v, scalar_keys, device) for k, v in other.state.get(p, {}).items()}
                for p in group["params"]
            ])
        self._reference_shapes = [p.shape for p in reference]
        self._fmodel = fmodel
        self._device = device
        self._grad_callback = grad_callback
        self._track_higher_grads = track_higher_grads
        self._apply_override(override)
        self._tracked = sorted({i for indices in self._group_to_param_list for i in indices})

    def _apply_override(self, override: Override | None) -> None:
        """Merges ``override`` into the param groups (higher's method; see :mod:`metaloop.optim.hyperparams`)."""
        merge_override(self.param_groups, override)
        if self.rule is not None and self.rule.check is not None:
            for group in self.param_groups:
                for hparams in per_parameter(group):
                    self.rule.check(hparams)

    @property
    def track_higher_grads(self) -> bool:
        """Whether steps build a graph for higher-order gradients."""
        return self._track_higher_grads

    def _resolve_params(self, params: Iterable[Tensor] | None) -> list[Tensor]:
        if params is None:
            if self._fmodel is None or self._fmodel.fast_params is None:
                raise ValueError(
                    "step() needs params=: this differentiable optimizer was built without an fmodel "
                    "holding fast weights"
                )
            latest = self._fmodel.fast_params
            if len(latest) == len(self._reference_shapes):
                return list(latest)  # checked when the functional module recorded them
            params = latest
        params = list(params)
        if len(params) != len(self._reference_shapes):
            raise ValueError(
                f"step() got {len(params)} fast weights but the optimizer was built for "
                f"{len(self._reference_shapes)} (one per reference parameter)"
            )
        for i, (p, shape) in enumerate(zip(params, self._reference_shapes)):
            if not isinstance(p, Tensor):
                raise TypeError(f"fast weight {i} must be a Tensor, got {type(p).__name__}")
            if p.shape != shape:
                raise ValueError(f"fast weight {i} has shape {tuple(p.shape)}, expected {tuple(shape)}")
        return params

    def step(
        self,
        loss: Tensor,
        params: Iterable[Tensor] | None = None,
        override: Override | None = None,
        grad_callback: GradCallback | None = None,
        **kwargs: Any,
    ) -> list[Tensor]:
        """Returns the fast weights after one update on ``loss`` (and records them in ``fmodel``).

        ``override`` is merged into the param groups and stays in effect for later steps,
        as in higher; ``grad_callback`` replaces the constructor's for this step. ``**kwargs``
        go to ``_update``; the rule-based ``_update`` takes none.

        Raises:
            TypeError: for keyword arguments that no ``_update`` reads.
        """
        if kwargs and type(self)._update is DifferentiableOptimizer._update:
            raise _unknown_options("step()", kwargs, _STEP_ARGS)
        params = self._resolve_params(params)
        if override is not None:
            self._apply_override(override)
        wrt = [i for i in self._tracked if params[i].requires_grad]
        grads: list[Tensor | None] = [None] * len(params)
        if wrt and not loss.requires_grad:
            raise ValueError(
                "the loss passed to step() has no graph (was it computed under torch.no_grad()?); "
                "run inner loops with grad enabled, and use track_higher_grads=False for evaluation"
            )
        if wrt:
            computed = torch.autograd.grad(
                loss, [params[i] for i in wrt], create_graph=self._track_higher_grads, allow_unused=True
            )
            for i, g in zip(wrt, computed):
                if g is not None and g.is_sparse:
                    raise ValueError(
                        f"fast weight {i} received a sparse gradient; differentiable optimizers need "
                        "dense gradients (e.g. nn.Embedding(sparse=False))"
                    )
                grads[i] = g
        callback = grad_callback if grad_callback is not None else self._grad_callback
        if callback is not None:
            grads = list(callback(grads))
        grouped_grads = [[grads[i] for i in indices] for indices in self._group_to_param_list]
        for group, indices in zip(self.param_groups, self._group_to_param_list):
            group["params"] = [params[i] for i in indices]
        if self._track_higher_grads:
            self._update(grouped_grads, **kwargs)
        else:
            with torch.no_grad():
                self._update(grouped_grads, **kwargs)
        new_params = list(params)
        for group, indices in zip(self.param_groups, self._group_to_param_list):
            for i, p in zip(indices, group["params"]):
                new_params[i] = p
        if not self._track_higher_grads:
            new_params = [p.detach().requires_grad_(p0.requires_grad) for p, p0 in zip(new_params, params)]
            self.state = _recursive_map(self.state, lambda x: x.detach() if isinstance(x, Tensor) else x)
        if self._fmodel is not None:
            # A rule keeps shapes (the transform rule checks), so only _update overrides are re-checked.
            self._fmodel._record(new_params, check=self.rule is None)
        return new_params

    def _update(self, grouped_grads: GroupedGrads, **kwargs: Any) -> None:
        """Writes the new fast weights into ``self.param_groups[g]["params"]``: one :func:`~metaloop.optim.rules.apply_rule` step."""
        rule = self.rule
        if rule is None:
            raise TypeError(
                f"{type(self).__name__} defines neither a rule nor _update(); subclass "
                "DifferentiableOptimizer with `rule = Rule(init=..., update=...)` or override _update"
            )
        params = [p for group in self.param_groups for p in group["params"]]
        grads = [g for group_grads in grouped_grads for g in group_grads]
        states = [s for group_states in self.state for s in group_states]
        hparams = [hp for group in self.param_groups for hp in per_parameter(group)]
        new_params, new_states = apply_rule(rule, params, grads, states, hparams)
        start = 0
        for group, group_states in zip(self.param_groups, self.state):
            end = start + len(group["params"])
            group["params"] = new_params[start:end]
            group_states[:] = [s if s is not None else {} for s in new_states[start:end]]
            start = end


def _first_paragraph(text: str | None) -> str:
    return " ".join((text or "").strip().split("\n\n")[0].split())


def _shell(optim_type: type, rule: Rule) -> type[DifferentiableOptimizer]:
    """Returns the shell class ``Differentiable<Name>`` of a table row."""
    name = optim_type.__name__
    public = f"torch.optim.{name}" if getattr(torch.optim, name, None) is optim_type else f"{optim_type.__module__}.{name}"
    doc = f"A differentiable version of ``{public}``: {_first_paragraph(rule.update.__doc__)}"
    if rule.options:
        doc += f"\n\nOptions beyond ``{public}``'s: {', '.join(rule.options)} (see the rule)."
    return type(f"Differentiable{name}", (DifferentiableOptimizer,), {"rule": rule, "__doc__": doc, "__module__": __name__})


_CUSTOM_SHELLS: dict[type, type[DifferentiableOptimizer]] = {}  # higher-style classes given to register_optim
_SHELLS: dict[type, type[DifferentiableOptimizer]] = {t: _shell(t, rule) for t, rule in OPTIMIZERS.items()}
globals().update({shell.__name__: shell for shell in _SHELLS.values()})  # DifferentiableSGD, DifferentiableAdam, ...

__all__ = [
    "DifferentiableOptimizer",
    *(shell.__name__ for shell in _SHELLS.values()),
    "differentiable_version",
    "get_diff_optim",
    "create_diff_optim",
    "register_optim",
    "get_rule",
]


def register_optim(optim_type: type, diff_optim_type: type[DifferentiableOptimizer] | Rule) -> None:
    """Registers the differentiable version of ``optim_type``: a rule (a new table row) or a shell class.

    A :class:`~metaloop.optim.rules.Rule` also serves the Lightning module's fast loop; a
    higher-style class overriding ``_update`` serves ``innerloop_ctx`` only.
    """
    if not (isinstance(optim_type, type) and issubclass(optim_type, torch.optim.Optimizer)):
        raise TypeError(f"optim_type must be a torch.optim.Optimizer subclass, got {optim_type!r}")
    if isinstance(diff_optim_type, Rule):
        OPTIMIZERS[optim_type] = diff_optim_type
        _CUSTOM_SHELLS.pop(optim_type, None)
        return
    if not (isinstance(diff_optim_type, type) and issubclass(diff_optim_type, DifferentiableOptimizer)):
        raise TypeError(
            f"diff_optim_type must be a DifferentiableOptimizer subclass or a Rule, got {diff_optim_type!r}"
        )
    _CUSTOM_SHELLS[optim_type] = diff_optim_type
    if diff_optim_type.rule is not None:
        OPTIMIZERS[optim_type] = diff_optim_type.rule
    else:
        OPTIMIZERS.pop(optim_type, None)


def differentiable_version(optim_type: type) -> type[DifferentiableOptimizer]:
    """Returns the shell class for ``optim_type``: a registered class, or the one made from its table row.

    Raises:
        ValueError: for a type without a differentiable version, listing the supported ones.
    """
    if optim_type in _CUSTOM_SHELLS:
        return _CUSTOM_SHELLS[optim_type]
    rule = OPTIMIZERS.get(optim_type)
    if rule is not None:
        shell = _SHELLS.get(optim_type)
        if shell is None or shell.rule is not rule:
            shell = _SHELLS[optim_type] = _shell(optim_type, rule)
        return shell
    supported = ", ".join(sorted({t.__name__ for t in (*OPTIMIZERS, *_CUSTOM_SHELLS)}))
    if optim_type is torch.optim.SparseAdam:
        raise ValueError(
            "SparseAdam works on sparse gradients, which differentiable optimizers do not support; "
            f"use Adam or AdamW with dense gradients. Supported: {supported}"
        )
    raise ValueError(
        f"no differentiable version of {getattr(optim_type, '__name__', optim_type)}; supported: "
        f"{supported}. Add one with metaloop.optim.register_optim(YourOptimizer, Rule(init=..., update=...))"
    )


def get_rule(optim_type: type) -> Rule | None:
    """Returns the pure update rule of ``optim_type``'s differentiable version (None for an ``_update`` override)."""
    return differentiable_version(optim_type).rule


def get_diff_optim(
    opt: torch.optim.Optimizer,
    reference_params: Iterable[Tensor],
    fmodel: Any = None,
    device: Device = None,
    override: Override | None = None,
    track_higher_grads: bool = True,
    **kwargs: Any,
) -> DifferentiableOptimizer:
    """Returns a differentiable optimizer branching from ``opt`` (its state included)."""
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer, got {type(opt).__name__}")
    diff_type = differentiable_version(type(opt))
    return diff_type(
        opt, reference_params, fmodel=fmodel, device=device, override=override,
        track_higher_grads=track_higher_grads, **kwargs,
    )


def create_diff_optim(
    opt_type: type,
    opt_kwargs: Mapping[str, Any] | None = None,
    params: Iterable[Any] | None = None,
    fmodel: Any = None,
    device: Device = None,
    override: Override | None = None,
    track_higher_grads: bool = True,
    **kwargs: Any,
) -> DifferentiableOptimizer:
    """Returns a differentiable version of a new ``opt_type(params, **opt_kwargs)`` optimizer.

    ``params`` (fast weights, or param-group dicts with a ``"params"`` key) are used for
    their shapes only; without them, ``fmodel.fast_params`` is used. ``step`` then takes fast
    weights in the order they were given (groups concatenated).
    """
    differentiable_version(opt_type)
    if params is None:
        if fmodel is None or fmodel.fast_params is None:
            raise ValueError("create_diff_optim needs params= or an fmodel holding fast weights")
        params = fmodel.fast_params
    params = list(params)

    def placeholder(p: Tensor) -> Tensor:
        return torch.zeros_like(p, device=device if device is not None else p.device)

    reference: list[Tensor] = []
    if params and isinstance(params[0], Mapping):
        groups = []
        for group in params:
            holders = [placeholder(p) for p in group["params"]]
            reference.extend(holders)
            groups.append({**group, "params": holders})
        spec: Any = groups
    else:
        reference = [placeholder(p) for p in params]
        spec = reference
    opt = opt_type(spec, **dict(opt_kwargs or {}))
    return get_diff_optim(opt, reference, fmodel=fmodel, device=device, override=override,
                          track_higher_grads=track_higher_grads, **kwargs)
