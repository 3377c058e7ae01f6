"""Differentiable optimizers: higher-compatible stateful shells over the pure rules.

A :class:`DifferentiableOptimizer` branches from a live ``torch.optim`` optimizer: it copies
its param groups, hyperparameters and state (moments, step counts, momentum buffers), so an
unrolled loop continues where real training is. ``step(loss)`` returns new fast weights that
carry a graph back to the old ones and to any hyperparameter given as a tensor.

The table :data:`_OPTIM_TABLE` maps each ``torch.optim`` type to its differentiable version;
:func:`register_optim` extends it. A new differentiable optimizer either names a
:class:`~metaloop.optim.rules.Rule` (``rule = ...``) or, as in higher, overrides
``_update(grouped_grads)`` to write new fast weights into ``self.param_groups[g]["params"]``.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from metaloop.optim import rules
from metaloop.optim.hyperparams import Override, merge_override
from metaloop.utils import _recursive_map

__all__ = [
    "DifferentiableOptimizer",
    "DifferentiableSGD",
    "DifferentiableAdam",
    "DifferentiableAdamW",
    "DifferentiableAdamax",
    "DifferentiableAdadelta",
    "DifferentiableAdagrad",
    "DifferentiableASGD",
    "DifferentiableRMSprop",
    "DifferentiableRprop",
    "DifferentiableNAdam",
    "DifferentiableRAdam",
    "get_diff_optim",
    "create_diff_optim",
    "register_optim",
    "get_rule",
]

Device = torch.device | str | None
GradCallback = Callable[[list[Tensor | None]], Sequence[Tensor | None]]
_GradClosureType = Callable[[Tensor], Tensor]
_OverrideType = dict[str, list[Any]]


def _import_state_value(key: str, value: Any, scalar_keys: tuple[str, ...], device: Device) -> Any:
    """Returns one entry of a live optimizer's per-parameter state as a rule expects it."""
    if key in scalar_keys:
        number = value.item() if isinstance(value, Tensor) else value
        return int(number) if key == "step" else float(number)
    if isinstance(value, Tensor):
        return value.detach().clone().to(device)
    return value


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
        **kwargs: options of a particular optimizer (e.g. Rprop's ``smooth_sign``).
    """

    rule: ClassVar[rules.Rule | None] = None

    def __init__(
        self,
        other: torch.optim.Optimizer,
        reference_params: Iterable[Tensor],
        fmodel: Any = None,
        device: Device = None,
        override: Override | None = None,
        grad_callback: GradCallback | None = None,
        track_higher_grads: bool = True,
        **kwargs: Any,
    ) -> None:
        if not isinstance(other, torch.optim.Optimizer):
            raise TypeError(f"expected a torch.optim.Optimizer to branch from, got {type(other).__name__}")
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
            hyper = {k: v for k, v in group.items() if k != "params"}
            hyper.update(kwargs)
            self.param_groups.append({**hyper, "params": [reference[i] for i in indices]})
            self.state.append([
                {k: _import_state_value(k, v, scalar_keys, device) for k, v in other.state.get(p, {}).items()}
                for p in group["params"]
            ])
        self._reference_shapes = [p.shape for p in reference]
        self._fmodel = fmodel
        self._device = device
        self._grad_callback = grad_callback
        self._track_higher_grads = track_higher_grads
        merge_override(self.param_groups, override)
        self._per_param_keys = self._find_per_param_keys()
        self._tracked = sorted({i for indices in self._group_to_param_list for i in indices})

    def _find_per_param_keys(self) -> list[list[str]]:
        """Returns, per group, the hyperparameters given as one value per parameter (lists)."""
        return [[k for k, v in g.items() if k != "params" and isinstance(v, list)] for g in self.param_groups]

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
        as in higher; ``grad_callback`` replaces the constructor's for this step.
        """
        params = self._resolve_params(params)
        if override is not None:
            merge_override(self.param_groups, override)
            self._per_param_keys = self._find_per_param_keys()
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

    def _update(self, grouped_grads: list[list[Tensor | None]], **kwargs: Any) -> None:
        """Writes the new fast weights into ``self.param_groups[g]["params"]`` using ``self.rule``."""
        rule = self.rule
        if rule is None:
            raise TypeError(
                f"{type(self).__name__} defines neither a rule nor _update(); subclass "
                "DifferentiableOptimizer with `rule = Rule(init, update)` or override _update"
            )
        for group, grads, states, per_param in zip(self.param_groups, grouped_grads, self.state, self._per_param_keys):
            params = group["params"]
            active = [i for i, grad in enumerate(grads) if grad is not None]
            for i in active:
                if not states[i]:
                    states[i] = rule.init(params[i], {**group, **{k: group[k][i] for k in per_param}})
            if per_param:
                for i in active:
                    hp = {**group, **{k: group[k][i] for k in per_param}}
                    params[i], states[i] = rule.update(params[i], grads[i], states[i], hp)
                continue
            new_params, new_states = rules.apply_rule(
                rule, [params[i] for i in active], [grads[i] for i in active], [states[i] for i in active], group
            )
            for i, p, s in zip(active, new_params, new_states):
                params[i], states[i] = p, s


class DifferentiableSGD(DifferentiableOptimizer):
    """A differentiable version of ``torch.optim.SGD``."""

    rule = rules.SGD


class DifferentiableAdam(DifferentiableOptimizer):
    """A differentiable version of ``torch.optim.Adam``."""

    rule = rules.ADAM


class DifferentiableAdamW(DifferentiableOptimizer):
    """A differentiable version of ``torch.optim.AdamW``."""

    rule = rules.ADAM


class DifferentiableAdamax(DifferentiableOptimizer):
    """A differentiable version of ``torch.optim.Adamax``."""

    rule = rules.ADAMAX


class DifferentiableAdadelta(DifferentiableOptimizer):
    """A differentiable version of ``torch.optim.Adadelta``."""

    rule = rules.ADADELTA


class DifferentiableAdagrad(DifferentiableOptimizer):
    """A differentiable version of ``torch.optim.Adagrad``."""

    rule = rules.ADAGRAD


class DifferentiableASGD(DifferentiableOptimizer):
    """A differentiable version of ``torch.optim.ASGD``."""

    rule = rules.ASGD


class DifferentiableRMSprop(DifferentiableOptimizer):
    """A differentiable version of ``torch.optim.RMSprop`` (correct second-order gradients)."""

    rule = rules.RMSPROP


class DifferentiableRprop(DifferentiableOptimizer):
    """A differentiable version of ``torch.optim.Rprop``.

    The exact hypergradient through the sign of the gradient is zero. Pass
    ``smooth_sign=tau`` (> 0) to use ``tanh(g / tau)`` instead: a smooth relaxation.
    """

    rule = rules.RPROP

    def __init__(self, *args: Any, smooth_sign: float | Tensor = 0.0, **kwargs: Any) -> None:
        if not isinstance(smooth_sign, Tensor) and smooth_sign < 0:
            raise ValueError(f"smooth_sign={smooth_sign} must be >= 0 (0 keeps the exact sign)")
        super().__init__(*args, smooth_sign=smooth_sign, **kwargs)


class DifferentiableNAdam(DifferentiableOptimizer):
    """A differentiable version of ``torch.optim.NAdam``."""

    rule = rules.NADAM


class DifferentiableRAdam(DifferentiableOptimizer):
    """A differentiable version of ``torch.optim.RAdam``."""

    rule = rules.RADAM


_OPTIM_TABLE: dict[type, type[DifferentiableOptimizer]] = {
    torch.optim.SGD: DifferentiableSGD,
    torch.optim.Adam: DifferentiableAdam,
    torch.optim.AdamW: DifferentiableAdamW,
    torch.optim.Adamax: DifferentiableAdamax,
    torch.optim.Adadelta: DifferentiableAdadelta,
    torch.optim.Adagrad: DifferentiableAdagrad,
    torch.optim.ASGD: DifferentiableASGD,
    torch.optim.RMSprop: DifferentiableRMSprop,
    torch.optim.Rprop: DifferentiableRprop,
    torch.optim.NAdam: DifferentiableNAdam,
    torch.optim.RAdam: DifferentiableRAdam,
}


def register_optim(optim_type: type, diff_optim_type: type[DifferentiableOptimizer]) -> None:
    """Registers ``diff_optim_type`` as the differentiable version of ``optim_type``."""
    if not (isinstance(optim_type, type) and issubclass(optim_type, torch.optim.Optimizer)):
        raise TypeError(f"optim_type must be a torch.optim.Optimizer subclass, got {optim_type!r}")
    if not (isinstance(diff_optim_type, type) and issubclass(diff_optim_type, DifferentiableOptimizer)):
        raise TypeError(f"diff_optim_type must be a DifferentiableOptimizer subclass, got {diff_optim_type!r}")
    _OPTIM_TABLE[optim_type] = diff_optim_type


def _lookup(optim_type: type) -> type[DifferentiableOptimizer]:
    if optim_type in _OPTIM_TABLE:
        return _OPTIM_TABLE[optim_type]
    supported = ", ".join(sorted(t.__name__ for t in _OPTIM_TABLE))
    if optim_type is torch.optim.SparseAdam:
        raise ValueError(
            "SparseAdam works on sparse gradients, which differentiable optimizers do not support; "
            f"use Adam or AdamW with dense gradients. Supported: {supported}"
        )
    raise ValueError(
        f"no differentiable version of {getattr(optim_type, '__name__', optim_type)}; supported: "
        f"{supported}. Add one with metaloop.optim.register_optim(YourOptimizer, YourDifferentiableOptimizer)"
    )


def get_rule(optim_type: type) -> rules.Rule | None:
    """Returns the pure update rule of ``optim_type``'s differentiable version (None for an ``_update`` override)."""
    return _lookup(optim_type).rule


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
    diff_type = _lookup(type(opt))
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
    _lookup(opt_type)
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


def _get_mask_closure(mask: Tensor) -> _GradClosureType:
    """Returns a gradient hook that zeroes the gradient where ``mask`` is True (higher's helper)."""

    def closure(grad: Tensor) -> Tensor:
        grad = torch.where(mask, torch.zeros_like(grad), grad)
        if grad.requires_grad:
            grad.register_hook(_get_mask_closure(mask))
        return grad

    return closure


def _maybe_mask(tensor: Tensor, mask: Tensor) -> None:
    """Registers :func:`_get_mask_closure` on ``tensor`` if it requires grad (higher's helper)."""
    if tensor.requires_grad:
        tensor.register_hook(_get_mask_closure(mask))

