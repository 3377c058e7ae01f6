"""The fast inner loop: adapt a dict of weights by descending a loss of those weights with a pure rule.

This is the path :class:`~metaloop.lightning.MetaLightningModule` uses. Unlike the
higher-compatible shells it keeps no history and no Python object per step, but each step is
the same :func:`~metaloop.optim.rules.apply_rule` call, so both paths give the same numbers.
The loop runs task by task (gradients by :func:`torch.autograd.grad`) or for a whole
meta-batch at once under :func:`torch.func.vmap` (gradients by :func:`torch.func.grad`), which
is several times faster for small models.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, TypedDict

import torch
from torch import Tensor, nn

from metaloop.optim.rules import HParams, Rule, State, apply_rule

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["inner_loop", "inner_trajectory", "vmap_problems", "truncation_start", "straight_through"]

WeightsLoss = Callable[[dict[str, Tensor]], Tensor]
StepLoss = Callable[..., Tensor]  # loss(weights, step=index of the inner step)
StepHParams = Mapping[str, HParams] | Sequence[Mapping[str, HParams]]  # every step's, or one mapping per step


class LoopOptions(TypedDict, total=False):
    """How :func:`inner_loop` and :func:`inner_trajectory` differentiate; each is described in :func:`inner_loop`."""

    first_order: bool  # default False
    create_graph: bool  # default True
    batched: bool  # default False
    truncate: int | None  # default None


def inner_loop(
    loss: WeightsLoss, weights: Mapping[str, Tensor], *, rule: Rule, hparams: StepHParams, steps: int, **options: Unpack[LoopOptions]
) -> dict[str, Tensor]:
    """Returns ``weights`` after ``steps`` updates of ``rule`` descending ``loss(weights)``.

    Args:
        loss: the loss as a function of a dict of the current weights (e.g. a model run with
            :func:`torch.func.functional_call` on a task's support set).
        weights: the tensors to adapt, by name. As in ``torch.optim``, a weight that does not
            require grad is frozen, and one the loss does not use gets no gradient: neither
            moves, and its optimizer state is not advanced (momentum, moments, decay).
        hparams: each weight's hyperparameters (values may be tensors that require grad:
            learned learning rates, Meta-SGD's per-element rates, learned transforms); or a
            sequence of ``steps`` such mappings, the one of each step (MAML++'s per-step rates).
        **options: how the loop differentiates (:class:`LoopOptions`):
            - ``first_order``: drop second-order terms (FOMAML): gradients are detached, so the outer
                  gradient is the query gradient at the adapted weights.
            - ``create_graph``: keep the graph back to the initial weights and hyperparameters; False
                  adapts without one (evaluation): results are detached, memory stays flat in ``steps``.
            - ``batched``: True when called under :func:`torch.func.vmap` over tasks. Under vmap a weight
                  the loss does not use gets a zero gradient rather than none (:func:`torch.func.grad`
                  cannot tell them apart), and the caller checks the model with :func:`vmap_problems`.
            - ``truncate``: keep the graph of only the last ``truncate`` steps (truncated backpropagation;
                  memory grows with ``truncate``, not ``steps``); see :func:`truncation_start`. None
                  keeps all steps (full unroll); checked but moot when ``create_graph`` is False.

    Raises:
        ValueError: for negative ``steps``, a ``truncate`` outside ``0..steps``, ``hparams`` that
            do not name exactly the weights, or a sequence of them whose length is not ``steps``.

    Examples:
        Three SGD steps on ``(w - 2)^2`` from ``w = 0``, and the meta-gradient of the result:

        >>> from metaloop.optim import get_rule
        >>> w = torch.zeros((), requires_grad=True)
        >>> sgd = {"lr": 0.25, "momentum": 0, "dampening": 0, "nesterov": False, "weight_decay": 0, "maximize": False}
        >>> adapted = inner_loop(lambda ws: (ws["w"] - 2) ** 2, {"w": w}, rule=get_rule(torch.optim.SGD),
        ...                      hparams={"w": sgd}, steps=3)
        >>> adapted["w"].item()  # each step halves the distance to 2
        1.75
        >>> torch.autograd.grad(adapted["w"], w)  # d w_3 / d w_0 = (1 - 2 * 0.25)^3
        (tensor(0.1250),)
    """
    fast = dict(weights)
    for fast in inner_trajectory(lambda ws, step: loss(ws), weights, rule=rule, hparams=hparams, steps=steps, **options):
        pass
    return fast


def inner_trajectory(
    loss: StepLoss,
    weights: Mapping[str, Tensor],
    *,
    rule: Rule,
    hparams: StepHParams,
    steps: int,
    first_order: bool = False,
    create_graph: bool = True,
    batched: bool = False,
    truncate: int | None = None,
) -> Iterator[dict[str, Tensor]]:
    """Returns an iterator over the weights after each of the ``steps`` updates of :func:`inner_loop`.

    The same loop as :func:`inner_loop` (which returns its last element), for callers that score
    every step: MAML++'s multi-step loss (Antoniou et al. 2019) takes the query loss after each
    update. ``loss(weights, step=i)`` also receives the index of the step (``0..steps-1``) whose
    gradient it gives, so a model can use per-step parts (MAML++'s per-step BatchNorm). The
    arguments are checked when this is called, before any step runs; see :func:`inner_loop`.

    Raises:
        ValueError: as :func:`inner_loop`.
    """
    if steps < 0:
        raise ValueError(f"steps={steps} must be >= 0")
    start = truncation_start(steps, truncate)  # checked even without a graph, where no step is tracked
    names = list(weights)
    per_step = [hparams] * steps if isinstance(hparams, Mapping) else list(hparams)
    if len(per_step) != steps:
        raise ValueError(
            f"hparams has {len(per_step)} per-step mappings for steps={steps}; give one mapping (every step) or one per step"
        )
    for step_hparams in [hparams] if isinstance(hparams, Mapping) else per_step:
        if set(step_hparams) != set(names):
            missing, extra = sorted(set(names) - set(step_hparams)), sorted(set(step_hparams) - set(names))
            raise ValueError(
                f"hparams must name exactly the weights; missing {missing}, not among the weights {extra}"
            )
    return _trajectory(loss, weights, rule, per_step, create_graph, first_order, batched, start if create_graph else 0)


def _trajectory(
    loss: StepLoss,
    weights: Mapping[str, Tensor],
    rule: Rule,
    per_step: list[Mapping[str, HParams]],
    create_graph: bool,
    first_order: bool,
    batched: bool,
    tracked_from: int,
) -> Iterator[dict[str, Tensor]]:
    """The loop of :func:`inner_trajectory`, its arguments checked."""
    names = list(weights)
    trainable = [n for n in names if weights[n].requires_grad]
    fast = dict(weights)
    states: list = [None] * len(names)
    for step, step_hparams in enumerate(per_step):
        graph = create_graph and step >= tracked_from
        step_loss = functools.partial(loss, step=step)
        if batched:
            grads = _vmapped_grads(step_loss, fast, trainable, graph and not first_order)
        else:
            grads = _grads(step_loss, fast, trainable, graph and not first_order)
        new, states = apply_rule(rule, [fast[n] for n in names], [grads.get(n) for n in names], states,
                                 [step_hparams[n] for n in names], foreach=not batched)
        fast = dict(zip(names, new))
        if not graph:
            fast = {n: w.detach() for n, w in fast.items()}
        if step + 1 == tracked_from:
            fast, states = straight_through(weights, fast), [detach_state(s) for s in states]
        yield fast


def truncation_start(steps: int, truncate: int | None) -> int:
    """Returns the first inner step whose graph is kept when only the last ``truncate`` of ``steps`` are.

    Truncated backpropagation (Shaban et al. 2019, "Truncated Back-propagation for Bilevel
    Optimization") runs the first ``steps - truncate`` steps without a graph, then continues from
    :func:`straight_through` weights: the meta-gradient of the initial weights treats the
    untracked steps as the identity (as first-order MAML treats all of them), and learned
    hyperparameters get gradient from the tracked steps only. ``truncate = steps`` is the full
    unroll; ``truncate = 0`` differentiates no step.

    Raises:
        ValueError: for a ``truncate`` outside ``0..steps``.

    Examples:
        >>> truncation_start(10, 2)  # steps 8 and 9 are backpropagated through
        8
        >>> truncation_start(10, None)  # the full unroll
        0
    """
    if truncate is None:
        return 0
    if isinstance(truncate, bool) or not isinstance(truncate, int) or not 0 <= truncate <= steps:
        raise ValueError(
            f"truncate={truncate!r} must be an int in 0..steps={steps} (the number of last inner steps to "
            "backpropagate through); lower it or raise the number of steps"
        )
    return steps - truncate


def straight_through(initial: Mapping[str, Tensor], current: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Returns ``current``'s values with the gradient of ``initial``: ``initial + (current - initial).detach()``."""
    return {n: initial[n] + (w - initial[n]).detach() if initial[n].requires_grad else w for n, w in current.items()}


def detach_state(state: State | None) -> State | None:
    """Returns an optimizer state with every tensor detached (momentum, moments: no graph to earlier steps)."""
    if not state:
        return state
    return {k: v.detach() if isinstance(v, Tensor) else v for k, v in state.items()}


def _grads(loss: WeightsLoss, fast: dict[str, Tensor], trainable: list[str], create_graph: bool) -> dict[str, Tensor | None]:
    """Returns the gradient of ``loss`` for each trainable weight (None where the loss does not use it)."""
    wrt = [fast[n] if fast[n].requires_grad else fast[n].detach().requires_grad_() for n in trainable]
    fast.update(zip(trainable, wrt))
    value = loss(fast)
    if not wrt or not value.requires_grad:
        return {}
    return dict(zip(trainable, torch.autograd.grad(value, wrt, create_graph=create_graph, allow_unused=True)))


def _vmapped_grads(loss: WeightsLoss, fast: dict[str, Tensor], trainable: list[str], create_graph: bool) -> dict[str, Tensor]:
    """Returns :func:`torch.func.grad` of ``loss`` for each trainable weight (under vmap)."""
    frozen = {n: w for n, w in fast.items() if n not in trainable}
    grads = torch.func.grad(lambda ws: loss({**frozen, **ws}))({n: fast[n] for n in trainable})
    return grads if create_graph else {n: g.detach() for n, g in grads.items()}


def vmap_problems(model: nn.Module, second_order: bool = True, exact_norms: bool = False) -> list[str]:
    """Returns why ``model`` cannot adapt under :func:`torch.func.vmap` (empty if it can).

    Buffers (BatchNorm running statistics) cannot be updated in place by a vmapped loop. And in
    PyTorch 2.13, second-order gradients through BatchNorm, InstanceNorm and LayerNorm under vmap
    are wrong: PyTorch's batching rules for their backward passes drop terms (on a conv-BatchNorm
    net the meta-gradient differs from the task-by-task one by 1-4% of its size, in float64 too;
    ``benchmarks/vmap_batchnorm_bug.py``). First-order gradients, and GroupNorm, are right.
    ``exact_norms=True`` says the caller runs the vmap under :func:`metaloop.nn.exact_norms`, which
    computes those layers with plain operations, exact at every order: then only buffers remain a problem.
    """
    problems = [f"it has buffers ({', '.join(n for n, _ in list(model.named_buffers())[:3])})"] if any(
        True for _ in model.buffers()
    ) else []
    if second_order and not exact_norms:
        kinds = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm)
        norms = [n for n, m in model.named_modules() if isinstance(m, kinds)]
        if norms:
            problems.append(
                f"its normalization layers ({', '.join(norms[:3])}) get wrong second-order gradients under a plain vmap "
                "in PyTorch 2.13; run the vmap under metaloop.nn.exact_norms()"
            )
    return problems
