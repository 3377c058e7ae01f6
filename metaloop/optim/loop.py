"""The fast inner loop: adapt a module's weights on a support set with a pure rule.

This is the path :class:`~metaloop.lightning.MetaLightningModule` uses. Unlike the
higher-compatible shells it keeps no history and no Python object per step: weights are a
``dict`` of tensors handed to :func:`torch.func.functional_call`, and each update is a
:class:`~metaloop.optim.rules.Rule`. The same function runs task by task (gradients by
:func:`torch.autograd.grad`) or for a whole meta-batch at once under :func:`torch.func.vmap`
(gradients by :func:`torch.func.grad`), which is several times faster for small models.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metaloop.optim.rules import Rule, apply_rule

__all__ = ["adapt", "vmap_problems"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def adapt(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    loss_fn: LossFn,
    rule: Rule,
    hparams: Mapping[str, Mapping[str, Any]],
    steps: int,
    buffers: Mapping[str, Tensor] | None = None,
    first_order: bool = False,
    track_higher_grads: bool = True,
    batched: bool = False,
) -> dict[str, Tensor]:
    """Returns ``params`` after ``steps`` updates of ``rule`` on ``loss_fn(model(x), y)``.

    Args:
        params: every parameter of ``model`` by name; only those named in ``hparams``
            adapt, the others are used as they are (ANIL adapts the head only).
        hparams: for each adapted parameter, its hyperparameters (values may be tensors
            that require grad: learned learning rates, Meta-SGD's per-element rates).
        buffers: the module's buffers by name (BatchNorm statistics), updated in place in
            train mode; not supported with ``batched=True`` (see :func:`vmap_problems`).
        first_order: drop second-order terms (FOMAML): gradients are detached, so the outer
            gradient is the query gradient at the adapted weights.
        track_higher_grads: False adapts without any graph (evaluation); the result is
            detached and memory stays flat in ``steps``.
        batched: True when called under :func:`torch.func.vmap` over tasks.
    """
    if steps < 0:
        raise ValueError(f"steps={steps} must be >= 0")
    names = list(hparams)
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"hparams name parameters {missing} that are not among the model's {sorted(params)}")
    if batched:
        problems = vmap_problems(model, second_order=track_higher_grads and not first_order)
        if problems:
            raise ValueError(f"cannot adapt {type(model).__name__} under vmap: {'; '.join(problems)}; adapt task by task")
    fixed = {n: p for n, p in params.items() if n not in hparams}
    if buffers:
        fixed.update(buffers)
    fast = {n: params[n] for n in names}
    state = {n: rule.init(fast[n], hparams[n]) for n in names}
    create_graph = track_higher_grads and not first_order
    # Parameters sharing one hyperparameter dict are updated together (foreach kernels).
    by_hparams: dict[int, list[str]] = {}
    for n in names:
        by_hparams.setdefault(id(hparams[n]), []).append(n)
    groups = list(by_hparams.values())

    def support_loss(weights: dict[str, Tensor]) -> Tensor:
        return loss_fn(functional_call(model, {**fixed, **weights}, (x,)), y)

    for _ in range(steps):
        if batched:
            grads = torch.func.grad(support_loss)(fast)
            if not create_graph:
                grads = {n: g.detach() for n, g in grads.items()}
        else:
            wrt = [fast[n] for n in names]
            if not all(w.requires_grad for w in wrt):
                wrt = [w if w.requires_grad else w.detach().requires_grad_() for w in wrt]
                fast = dict(zip(names, wrt))
            computed = torch.autograd.grad(support_loss(fast), wrt, create_graph=create_graph, allow_unused=True)
            grads = {n: torch.zeros_like(w) if g is None else g for n, w, g in zip(names, wrt, computed)}
        for group in groups:
            hp = hparams[group[0]]
            new_fast, new_state = apply_rule(
                rule, [fast[n] for n in group], [grads[n] for n in group], [state[n] for n in group], hp,
                foreach=not batched,
            )
            fast.update(zip(group, new_fast))
            state.update(zip(group, new_state))
        if not track_higher_grads:
            fast = {n: w.detach() for n, w in fast.items()}
    return {**{n: p for n, p in params.items() if n not in hparams}, **fast}


def vmap_problems(model: nn.Module, second_order: bool = True) -> list[str]:
    """Returns why ``model`` cannot adapt under :func:`torch.func.vmap` (empty if it can).

    Buffers (BatchNorm running statistics) cannot be updated in place by a vmapped loop. And
    in PyTorch 2.13, second-order gradients through BatchNorm's batch statistics under vmap are
    wrong: on a conv-BatchNorm net the meta-gradient of the layers before the BatchNorm differs
    from the task-by-task one by up to 10% of its size, in float64 too (first-order gradients
    agree), so a second-order loop over BatchNorm layers goes task by task.
    """
    problems = [f"it has buffers ({', '.join(n for n, _ in list(model.named_buffers())[:3])})"] if any(
        True for _ in model.buffers()
    ) else []
    if second_order:
        norms = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if norms:
            problems.append(
                f"its BatchNorm layers ({', '.join(norms[:3])}) get wrong second-order gradients under vmap "
                "in PyTorch 2.13"
            )
    return problems
