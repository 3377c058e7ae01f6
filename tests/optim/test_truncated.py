"""Truncated meta-gradients (inner_loop(truncate=k)) against a hand-written truncated unroll, in float64."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.func import vmap

from metaloop.optim import OPTIMIZERS
from metaloop.optim.hyperparams import per_parameter
from metaloop.optim.loop import inner_loop

STEPS, MOMENTUM = 4, 0.5


def data(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(7, 3, generator=gen), torch.randn(7, generator=gen),
            torch.randn(5, 3, generator=gen), torch.randn(5, generator=gen)]


def loss_of(x, y):
    """A nonlinear regression loss (so that second-order terms matter)."""
    return lambda w: ((torch.tanh(x @ w["w"]) * w["s"] - y) ** 2).mean()


def initial():
    gen = torch.Generator().manual_seed(1)
    return {"w": torch.randn(3, generator=gen).requires_grad_(), "s": torch.tensor(1.5, requires_grad=True)}


def hparams_for(optim: type[torch.optim.Optimizer], lr: torch.Tensor, **options):
    """Returns the rule of ``optim`` and hyperparameters of both weights, with a learned ``lr``."""
    (hp,) = per_parameter(optim([torch.zeros(1, requires_grad=True)], lr=0.1, **options).param_groups[0])
    return OPTIMIZERS[optim], {"w": {**hp, "lr": lr}, "s": {**hp, "lr": lr}}


def hand_truncated(weights, lr, x, y, steps, k):
    """SGD with momentum, written out: the first steps - k steps without graph, then straight through."""
    loss = loss_of(x, y)
    fast, bufs = dict(weights), {}
    for t in range(steps):
        tracked = t >= steps - k
        wrt = {n: w if tracked else w.detach().requires_grad_() for n, w in fast.items()}
        grads = dict(zip(wrt, torch.autograd.grad(loss(wrt), list(wrt.values()), create_graph=tracked)))
        for n in fast:
            bufs[n] = grads[n] if n not in bufs else MOMENTUM * bufs[n] + grads[n]
            fast[n] = wrt[n] - lr * bufs[n]
            if not tracked:
                fast[n] = fast[n].detach()
        if t == steps - k - 1:
            fast = {n: weights[n] + (w - weights[n]).detach() for n, w in fast.items()}
            bufs = {n: b.detach() for n, b in bufs.items()}
    return fast


def meta_grads(adapted, weights, lr, xq, yq):
    query = loss_of(xq, yq)(adapted)
    return torch.autograd.grad(query, [*weights.values(), lr], allow_unused=True)


@pytest.mark.parametrize("k", [0, 1, 2, STEPS])
def test_truncated_equals_a_hand_written_truncated_unroll(k):
    x, y, xq, yq = data()
    weights, lr = initial(), torch.tensor(0.3, requires_grad=True)
    rule, hparams = hparams_for(torch.optim.SGD, lr, momentum=MOMENTUM)
    adapted = inner_loop(loss_of(x, y), weights, rule=rule, hparams=hparams, steps=STEPS, truncate=k)
    expected = hand_truncated(weights, lr, x, y, STEPS, k)
    for n in weights:
        torch.testing.assert_close(adapted[n], expected[n], rtol=1e-12, atol=1e-14)
    got, want = meta_grads(adapted, weights, lr, xq, yq), meta_grads(expected, weights, lr, xq, yq)
    for g, w in zip(got, want):
        if w is None:
            assert g is None or g.eq(0).all()
        else:
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("optim, options", [(torch.optim.SGD, {"momentum": MOMENTUM}), (torch.optim.Adam, {}),
                                            (torch.optim.RMSprop, {"momentum": 0.3})])
@pytest.mark.parametrize("batched", [False, True])
def test_truncate_equal_to_steps_is_the_full_unroll_exactly(optim, options, batched):
    tasks = [torch.stack(t) for t in zip(*(data(seed) for seed in range(2)))]
    weights, lr = initial(), torch.tensor(0.1, requires_grad=True)
    rule, hparams = hparams_for(optim, lr, **options)

    def task_loss(x, y, xq, yq, truncate=None):
        adapted = inner_loop(loss_of(x, y), weights, rule=rule, hparams=hparams, steps=STEPS, truncate=truncate,
                             batched=batched)
        return loss_of(xq, yq)(adapted)

    def grads(truncate):
        fn = functools.partial(task_loss, truncate=truncate)
        total = vmap(fn)(*tasks).sum() if batched else sum(fn(*(t[i] for t in tasks)) for i in range(2))
        return torch.autograd.grad(total, [*weights.values(), lr])

    for full, truncated in zip(grads(None), grads(STEPS)):
        assert torch.equal(full, truncated)


def test_truncated_under_vmap_equals_task_by_task():
    tasks = [torch.stack(t) for t in zip(*(data(seed) for seed in range(3)))]
    weights, lr = initial(), torch.tensor(0.3, requires_grad=True)
    rule, hparams = hparams_for(torch.optim.SGD, lr, momentum=MOMENTUM)

    def task_loss(x, y, xq, yq, batched):
        adapted = inner_loop(loss_of(x, y), weights, rule=rule, hparams=hparams, steps=STEPS, truncate=2,
                             batched=batched)
        return loss_of(xq, yq)(adapted)

    batched = torch.autograd.grad(vmap(functools.partial(task_loss, batched=True))(*tasks).sum(), [*weights.values(), lr])
    sequential = torch.autograd.grad(sum(task_loss(*(t[i] for t in tasks), batched=False) for i in range(3)),
                                     [*weights.values(), lr])
    for b, s in zip(batched, sequential):
        torch.testing.assert_close(b, s, rtol=1e-10, atol=1e-14)


def test_truncate_zero_is_first_order_for_the_initial_weights():
    x, y, xq, yq = data()
    weights, lr = initial(), torch.tensor(0.3, requires_grad=True)
    rule, hparams = hparams_for(torch.optim.SGD, lr)
    adapted = inner_loop(loss_of(x, y), weights, rule=rule, hparams=hparams, steps=STEPS, truncate=0)
    grads = meta_grads(adapted, weights, lr, xq, yq)
    point = {n: w.detach().requires_grad_() for n, w in adapted.items()}
    at_adapted = torch.autograd.grad(loss_of(xq, yq)(point), list(point.values()))
    for g, want in zip(grads[:2], at_adapted):
        torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-14)
    assert grads[2] is None  # no tracked step: the learning rate gets no gradient


def graph_size(tensors) -> int:
    """Returns the number of autograd nodes reachable from ``tensors``."""
    seen, stack = set(), [t.grad_fn for t in tensors if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions if next_node is not None)
    return len(seen)


def test_the_graph_grows_with_truncate_not_with_steps():
    x, y, _, _ = data()
    weights, lr = initial(), torch.tensor(0.3, requires_grad=True)
    rule, hparams = hparams_for(torch.optim.SGD, lr, momentum=MOMENTUM)

    def size(steps, truncate):
        adapted = inner_loop(loss_of(x, y), weights, rule=rule, hparams=hparams, steps=steps, truncate=truncate)
        return graph_size(adapted.values())

    assert size(5, 2) == size(20, 2)
    assert size(20, 2) < size(20, 4) < size(20, None)
    assert size(10, None) < size(20, None)


@pytest.mark.parametrize("truncate", [5, -1, 1.5, True])
def test_bad_truncate_raises_one_clear_error(truncate):
    weights = initial()
    rule, hparams = hparams_for(torch.optim.SGD, torch.tensor(0.1))
    with pytest.raises(ValueError, match=f"truncate={truncate!r} must be an int in 0..steps=4"):
        inner_loop(loss_of(*data()[:2]), weights, rule=rule, hparams=hparams, steps=4, truncate=truncate)


def test_truncate_is_ignored_without_a_graph():
    x, y, _, _ = data()
    weights = initial()
    rule, hparams = hparams_for(torch.optim.SGD, torch.tensor(0.1))
    plain = inner_loop(loss_of(x, y), weights, rule=rule, hparams=hparams, steps=3, create_graph=False)
    truncated = inner_loop(loss_of(x, y), weights, rule=rule, hparams=hparams, steps=3, create_graph=False, truncate=1)
    for n in weights:
        assert torch.equal(plain[n], truncated[n]) and not truncated[n].requires_grad
