"""Small helpers shared by the functional core, with higher's names and semantics.

higher users import ``higher.utils.flatten``, ``get_func_params`` and the private
``_recursive_map``/``_find_param_in_list``; they live here under the same names so
``from metaloop import utils`` is a drop-in replacement.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch

__all__ = ["flatten", "get_func_params", "unflatten_like"]


def _is_container(target: Any) -> bool:
    return isinstance(target, (list, tuple, dict, set))


def _recursive_map(target: Any, map_fn: Callable[[Any], Any]) -> Any:
    """Returns ``target`` with ``map_fn`` applied to every leaf of nested lists, tuples, dicts and sets."""
    if isinstance(target, list):
        return [_recursive_map(x, map_fn) for x in target]
    if isinstance(target, tuple):
        mapped = [_recursive_map(x, map_fn) for x in target]
        return type(target)(*mapped) if hasattr(target, "_fields") else type(target)(mapped)
    if isinstance(target, dict):
        return type(target)((k, _recursive_map(v, map_fn)) for k, v in target.items())
    if isinstance(target, set):
        return {_recursive_map(x, map_fn) for x in target}
    return map_fn(target)


def flatten(x: Any) -> list[Any]:
    """Returns the leaves of a nested structure of lists, tuples, dicts (values) and sets, in order."""
    if not _is_container(x):
        return [x]
    items = x.values() if isinstance(x, dict) else x
    return [leaf for item in items for leaf in flatten(item)]


def unflatten_like(leaves: Sequence[Any], structure: Any) -> Any:
    """Returns ``leaves`` arranged in the nesting of ``structure`` (the inverse of :func:`flatten`)."""
    it = iter(leaves)
    result = _recursive_map(structure, lambda _: next(it))
    remaining = sum(1 for _ in it)
    if remaining:
        raise ValueError(f"unflatten_like got {len(leaves)} leaves but the structure holds {len(leaves) - remaining}")
    return result


def _copy_tensor(
    t: torch.Tensor,
    safe_copy: bool,
    device: torch.device | str | None = None,
    requires_grad: bool | None = None,
) -> torch.Tensor:
    if requires_grad is None:
        requires_grad = t.requires_grad
    t = t.detach()
    if safe_copy:
        t = t.clone()
    if device is not None:
        t = t.to(device)
    return t.requires_grad_(requires_grad)


def get_func_params(
    module: torch.nn.Module,
    device: torch.device | str | None = None,
    safe_copy: bool = True,
) -> list[torch.Tensor]:
    """Returns detached copies of ``module.parameters()`` that keep each parameter's ``requires_grad``.

    With ``safe_copy=False`` the tensors share storage with the module's parameters.
    """
    return [_copy_tensor(p, safe_copy, device) for p in module.parameters()]


def _find_param_in_list(param: torch.Tensor, tensors: Iterable[torch.Tensor]) -> int | None:
    """Returns the index of ``param`` in ``tensors`` by identity, or None."""
    for i, p in enumerate(tensors):
        if p is param:
            return i
    return None


def _get_param_mapping(module: torch.nn.Module, seen: list[torch.Tensor], mapping: list[int]) -> list[int]:
    """Returns, for every parameter slot of ``module`` (tied ones repeated), its index among unique parameters."""
    for param in module._parameters.values():
        if param is None:
            continue
        found = _find_param_in_list(param, seen)
        if found is None:
            mapping.append(len(seen))
            seen.append(param)
        else:
            mapping.append(found)
    for child in module._modules.values():
        if child is not None:
            _get_param_mapping(child, seen, mapping)
    return mapping
