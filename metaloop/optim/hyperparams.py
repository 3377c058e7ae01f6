"""Hyperparameter overrides: the one place where learned values are merged into param groups.

An *override* is a dict mapping a hyperparameter name (as given to the ``torch.optim``
constructor or found in a param group) to either a single value for every group, or a
``list`` with one value per group (a one-element list also means "every group"). A value may
be a Python number, a tensor (that requires grad, to learn it), a tuple of those (``betas``),
or a ``list`` with one value per parameter of the group (per-parameter learning rates, as in
Meta-SGD).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, MutableMapping, Sequence

import torch

from metaloop.utils import _recursive_map

__all__ = [
    "merge_override",
    "check_override",
    "hyperparameter_names",
    "get_trainable_opt_params",
    "apply_trainable_opt_params",
    "per_parameter",
]

Override = Mapping[str, Any]

# Group entries that are options of the implementation, not hyperparameters of the maths.
_NOT_HYPERPARAMETERS = frozenset({"params", "param_names", "foreach", "fused", "capturable", "differentiable", "name"})


def _per_group(key: str, value: Any, n_groups: int) -> list[Any]:
    if isinstance(value, list):
        if len(value) == 1:
            return value * n_groups
        if len(value) == n_groups:
            return list(value)
        raise ValueError(
            f"override {key!r} has {len(value)} values but the optimizer has {n_groups} param "
            f"group(s); give one value (for all groups) or {n_groups} (one per group)"
        )
    return [value] * n_groups


def check_override(override: Override | None, groups: Sequence[Mapping[str, Any]]) -> None:
    """Raises ``ValueError`` for an override key no group knows or a per-group list of the wrong length."""
    if override is None:
        return
    if not isinstance(override, Mapping):
        raise TypeError(f"override must be a dict of hyperparameter name -> value(s), got {type(override).__name__}")
    known = hyperparameter_names(groups)
    for key, value in override.items():
        if key not in known:
            raise ValueError(f"unknown override key {key!r}; this optimizer's hyperparameters are {known}")
        for group, v in zip(groups, _per_group(key, value, len(groups))):
            if isinstance(v, list) and len(v) != len(group["params"]):
                raise ValueError(
                    f"override {key!r} gives {len(v)} per-parameter values for a group of "
                    f"{len(group['params'])} parameters"
                )


def merge_override(groups: Sequence[MutableMapping[str, Any]], override: Override | None) -> None:
    """Writes ``override`` into ``groups`` (validated first; see the module docstring)."""
    if not override:
        return
    check_override(override, groups)
    for key, value in override.items():
        for group, v in zip(groups, _per_group(key, value, len(groups))):
            group[key] = v


def get_trainable_opt_params(opt: torch.optim.Optimizer, device: torch.device | str | None = None) -> dict[str, list[Any]]:
    """Returns an override dict whose values are leaf tensors requiring grad, one list entry per group.

    Every real-number hyperparameter of ``opt``'s param groups (and tuples of them, like
    ``betas``) becomes a float tensor; booleans, ``None`` and strings are left out.
    """

    def is_number(x: Any) -> bool:
        return (isinstance(x, (int, float)) and not isinstance(x, bool)) or (
            isinstance(x, torch.Tensor) and x.is_floating_point()
        )

    def to_tensor(x: Any) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            return x.detach().clone().to(device).requires_grad_()
        return torch.tensor(float(x), device=device, requires_grad=True)

    override: dict[str, list[Any]] = {}
    for group in opt.param_groups:
        for key, value in group.items():
            if key in _NOT_HYPERPARAMETERS:
                continue
            leaves = value if isinstance(value, (tuple, list)) else (value,)
            if leaves and all(is_number(x) for x in leaves):
                override.setdefault(key, []).append(_recursive_map(value, to_tensor))
    return override


def apply_trainable_opt_params(opt: torch.optim.Optimizer, override: Override) -> None:
    """Writes learned hyperparameters back into ``opt``'s param groups (in place), keeping each value's type.

    As in higher, a tensor replacing a Python number becomes a number of that number's type
    (Adam's ``weight_decay=0`` stays an int), except that a non-integral value replacing an int
    becomes a float rather than being truncated (a learned momentum of 0.9 stays 0.9); one
    replacing a tensor is stored detached; tuples (``betas``) are handled element by element.
    """
    check_override(override, opt.param_groups)
    for key, value in override.items():
        for group, v in zip(opt.param_groups, _per_group(key, value, len(opt.param_groups))):
            group[key] = _like(v, group[key])


def _like(value: Any, current: Any) -> Any:
    """Returns ``value`` (a learned tensor, or a tuple/list of them) as a value of ``current``'s type."""
    if isinstance(value, (tuple, list)):
        same_shape = isinstance(current, (tuple, list)) and len(current) == len(value)
        currents = current if same_shape else [current] * len(value)  # per-parameter values of a number
        return type(current if same_shape else value)(_like(v, c) for v, c in zip(value, currents))
    if not isinstance(value, torch.Tensor):
        return value
    if isinstance(current, (int, float)) and not isinstance(current, bool) and value.numel() == 1:
        number = float(value.item())
        return int(number) if isinstance(current, int) and number.is_integer() else number
    return value.detach().clone()


def per_parameter(group: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Returns one hyperparameter mapping per parameter of param group ``group``.

    Entries given as lists (one value per parameter: Meta-SGD's learning rates, learned
    transforms) are split; the others are shared. Without list entries every parameter gets the
    same mapping object. Options of the implementation (``foreach``, ``fused``, ...) are left out.
    """
    n = len(group["params"])
    shared = {k: v for k, v in group.items() if k not in _NOT_HYPERPARAMETERS and not isinstance(v, list)}
    lists = {k: v for k, v in group.items() if k not in _NOT_HYPERPARAMETERS and isinstance(v, list)}
    if not lists:
        return [shared] * n
    return [{**shared, **{k: v[i] for k, v in lists.items()}} for i in range(n)]


def hyperparameter_names(groups: Iterable[Mapping[str, Any]]) -> list[str]:
    """Returns the sorted names of the hyperparameters present in ``groups``."""
    return sorted({k for g in groups for k in g} - _NOT_HYPERPARAMETERS)
