"""Differentiable edits of an ordinary ``nn.Module``: clone it, update it, detach it (learn2learn's names).

learn2learn-style meta-learning keeps the model an ordinary module and swaps the tensors it
holds: :func:`clone_module` gives a copy whose parameters are differentiable functions of the
original's, :func:`update_module` replaces each parameter ``p`` by ``p + p.update`` on the
graph, and :func:`detach_module` cuts the graph. The module's forward code is untouched and
no class is rewritten: only the entries of each submodule's ``_parameters`` and ``_buffers``
change (to plain tensors that may carry a graph, as in learn2learn).

A tensor reachable from several places (tied weights, a shared submodule) is mapped once
through ``memo`` (a dict from each original tensor to its replacement), so ties survive every
operation. RNNs keep working: since PyTorch 2.0 an RNN re-reads its flat weight list when it
sees new weight tensors.
"""

from __future__ import annotations

from typing import Callable, Iterable

from torch import Tensor, nn

__all__ = ["clone_module", "update_module", "detach_module"]

Memo = dict[Tensor, Tensor]


def _map_tensors(module: nn.Module, fn: Callable[[Tensor], Tensor], memo: Memo) -> None:
    """Replaces, in place, each parameter and buffer ``t`` of ``module``'s tree by ``memo[t] = fn(t)``.

    ``fn`` runs once per distinct tensor (``memo`` maps originals to replacements), so a
    tensor held in two places is replaced by one tensor in both.
    """
    for sub in module.modules():
        for registry in (sub._parameters, sub._buffers):
            for name, t in registry.items():
                if t is None:
                    continue
                if t not in memo:
                    memo[t] = fn(t)
                registry[name] = memo[t]


def _copy_tree(module: nn.Module, copies: dict[nn.Module, nn.Module]) -> nn.Module:
    """Returns a shallow copy of ``module``'s tree: new module objects, same tensors (shared submodules stay shared)."""
    if module in copies:
        return copies[module]
    clone = module.__new__(type(module))
    clone.__dict__ = module.__dict__.copy()
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    copies[module] = clone
    clone._modules = {k: None if m is None else _copy_tree(m, copies) for k, m in module._modules.items()}
    return clone


def clone_module(module: nn.Module, memo: Memo | None = None) -> nn.Module:
    """Returns a copy of ``module`` whose parameters and buffers are ``clone()``s of the original's.

    The clones stay on the graph, so a loss computed with the copy has gradients with respect
    to the original parameters (the basis of MAML's ``learner = clone_module(model)``).
    Buffers are cloned too: running statistics updated by the copy leave the original alone.
    Parameters tied in ``module`` (the same tensor in two places) are tied in the copy; pass
    the same ``memo`` dict (it maps each original tensor to its clone) to several calls to
    keep ties across modules.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"clone_module expects an nn.Module, got {type(module).__name__}")
    clone = _copy_tree(module, {})
    _map_tensors(clone, lambda t: t.clone(), {} if memo is None else memo)
    return clone


def update_module(
    module: nn.Module,
    updates: Iterable[Tensor | None] | None = None,
    memo: Memo | None = None,
) -> nn.Module:
    """Returns ``module`` after replacing, in place, each parameter ``p`` by ``p + p.update``.

    With ``updates`` (one per entry of ``module.parameters()``, None to leave a parameter
    alone), each ``p.update`` is set first. As in learn2learn the update is *added*: pass
    ``-lr * grad`` for a gradient step. Tensors (buffers included) without an ``update``
    attribute, or with ``update = None``, are kept; ``p.update`` is reset to None once used.
    The new parameters are on the graph, so later losses differentiate through the update.

    Raises:
        ValueError: if ``updates`` does not have one entry per parameter, or an update's
            shape differs from its parameter's.
    """
    if updates is not None:
        named = list(module.named_parameters())
        updates = list(updates)
        if len(updates) != len(named):
            raise ValueError(
                f"update_module got {len(updates)} updates for a module with {len(named)} parameters; "
                "give one per entry of module.parameters() (None to skip one)"
            )
        for (name, p), u in zip(named, updates):
            if u is not None and u.shape != p.shape:
                raise ValueError(
                    f"update for parameter {name!r} has shape {tuple(u.shape)} but the parameter has "
                    f"shape {tuple(p.shape)}; the update must match its parameter"
                )
            p.update = u

    def apply(t: Tensor) -> Tensor:
        update = getattr(t, "update", None)
        if update is None:
            return t
        t.update = None
        return t + update

    _map_tensors(module, apply, {} if memo is None else memo)
    return module


def detach_module(module: nn.Module, keep_requires_grad: bool = False) -> None:
    """Detaches every parameter and buffer of ``module`` from the graph, in place (returns None).

    Each tensor that carries a graph is replaced by its ``detach()``: the module no longer
    backpropagates into whatever it was cloned or updated from. With ``keep_requires_grad``
    the detached tensors that required grad still do (fresh leaves, e.g. to continue
    first-order training); otherwise they do not. Leaf tensors whose ``requires_grad`` does
    not change are kept as they are, so optimizers holding them stay valid. Ties are kept.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"detach_module expects an nn.Module, got {type(module).__name__}")

    def detach(t: Tensor) -> Tensor:
        requires_grad = keep_requires_grad and t.requires_grad
        if t.grad_fn is None and t.requires_grad == requires_grad:
            return t
        detached = t.detach().requires_grad_(requires_grad)
        return nn.Parameter(detached, requires_grad=requires_grad) if isinstance(t, nn.Parameter) else detached

    _map_tensors(module, detach, {})
