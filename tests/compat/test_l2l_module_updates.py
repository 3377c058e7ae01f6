"""clone_module / update_module / detach_module: graphs, ties and buffers as in learn2learn."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from metaloop.compat.learn2learn.utils.module_updates import clone_module, detach_module, update_module

F64 = torch.float64


class TiedNet(nn.Module):
    """Linear -> BatchNorm -> Linear, with the output layer's weight tied to a second head."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.out = nn.Linear(4, 4)
        self.head = nn.Linear(4, 4)
        self.head.weight = self.out.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.bn(self.inp(x)))
        return self.head(torch.tanh(self.out(h)))


@pytest.fixture
def net() -> TiedNet:
    torch.manual_seed(0)
    return TiedNet().double()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(6, 3, dtype=F64, generator=torch.Generator().manual_seed(1))


def test_clone_gradients_reach_the_original(net, x):
    """d loss(clone) / d original == d loss(original) / d original (1e-12); the clone's outputs are identical."""
    reference = copy.deepcopy(net)
    clone = clone_module(net)
    torch.testing.assert_close(clone(x), reference(x), rtol=0, atol=0)
    clone(x).pow(2).sum().backward()
    reference(x).pow(2).sum().backward()
    for p, q in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12)
    assert all(not p.is_leaf for p in clone.parameters())


def test_clone_keeps_ties_and_clones_buffers(net, x):
    clone = clone_module(net)
    assert clone.head.weight is clone.out.weight
    assert clone.out.weight is not net.out.weight and clone.out.weight.grad_fn is not None
    assert len(list(clone.parameters())) == len(list(net.parameters())) == 7
    before = net.bn.running_mean.clone()
    assert clone.bn.running_mean is not net.bn.running_mean
    clone.train()(x)  # updates the clone's running statistics in place
    torch.testing.assert_close(net.bn.running_mean, before, rtol=0, atol=0)
    assert (clone.bn.running_mean - before).abs().max() > 1e-3
    assert int(net.bn.num_batches_tracked) == 0 and int(clone.bn.num_batches_tracked) == 1


def test_shared_memo_ties_across_calls():
    """Two modules sharing a Parameter, cloned with one memo, share the cloned tensor."""
    shared = nn.Linear(2, 2)
    a, b = nn.Sequential(shared), nn.Sequential(shared, nn.ReLU())
    memo: dict = {}
    ca, cb = clone_module(a, memo), clone_module(b, memo)
    assert ca[0].weight is cb[0].weight and memo[shared.weight] is ca[0].weight


def test_update_module_adds_updates_on_the_graph(net, x):
    """p <- p + u exactly; the tied weight gets its update once, in both places; gradients reach u."""
    clone = clone_module(net)
    updates = [torch.randn_like(p, requires_grad=True) for p in clone.parameters()]
    old = list(clone.parameters())
    update_module(clone, updates)
    for p, q, u in zip(clone.parameters(), old, updates):
        torch.testing.assert_close(p, q + u, rtol=0, atol=0)
    assert clone.head.weight is clone.out.weight
    assert all(getattr(q, "update", None) is None for q in old)
    loss = clone(x).pow(2).sum()
    grads = torch.autograd.grad(loss, updates + list(net.parameters()))
    for g_update, g_param in zip(grads[: len(updates)], grads[len(updates) :]):
        # p' = p + u, so d loss / d u == d loss / d p.
        torch.testing.assert_close(g_update, g_param, rtol=0, atol=1e-12)


def test_update_module_reads_the_update_attribute(net):
    """Without ``updates``, tensors carrying ``.update`` move and the others stay the same object."""
    weight, bias = net.inp.weight, net.inp.bias
    weight.update = torch.ones_like(weight)
    update_module(net)
    torch.testing.assert_close(net.inp.weight, weight + 1, rtol=0, atol=0)
    assert net.inp.bias is bias and weight.update is None


@pytest.mark.parametrize(
    "updates, message",
    [
        ([None] * 3, r"got 3 updates for a module with 7 parameters"),
        ([torch.zeros(3, 4)] + [None] * 6, r"update for parameter 'inp.weight' has shape \(3, 4\) but the parameter has shape \(4, 3\)"),
    ],
    ids=["count", "shape"],
)
def test_update_module_rejects_mismatched_updates(net, updates, message):
    with pytest.raises(ValueError, match=message):
        update_module(net, updates)


def test_detach_module_cuts_the_graph(net, x):
    clone = clone_module(net)
    update_module(clone, [torch.full_like(p, 0.01) for p in clone.parameters()])
    detach_module(clone)
    assert all(p.grad_fn is None and not p.requires_grad for p in clone.parameters())
    assert clone.head.weight is clone.out.weight
    out = clone(x)
    assert not out.requires_grad  # nothing left to differentiate: the original is unreachable
    assert all(p.grad is None for p in net.parameters())


def test_detach_module_keep_requires_grad_gives_fresh_leaves(net, x):
    clone = clone_module(net)
    detach_module(clone, keep_requires_grad=True)
    assert all(p.is_leaf and p.requires_grad for p in clone.parameters())
    clone(x).sum().backward()
    assert all(p.grad is None for p in net.parameters())
    assert all(p.grad is not None for p in clone.parameters())


def test_detach_module_keeps_unchanged_leaves(net):
    """Leaves whose requires_grad does not change are kept as the same objects (optimizers stay valid)."""
    params = list(net.parameters())
    detach_module(net, keep_requires_grad=True)
    assert all(p is q for p, q in zip(net.parameters(), params))


@pytest.mark.parametrize("rnn_cls", [nn.GRU, nn.LSTM])
def test_rnns_use_updated_flat_weights(rnn_cls):
    """An RNN cloned and updated runs with the new weights (matches functional_call, 1e-12) and backpropagates."""
    torch.manual_seed(0)
    rnn = rnn_cls(3, 4, num_layers=2).double()
    x = torch.randn(5, 2, 3, dtype=F64)
    clone = clone_module(rnn)
    updates = [0.1 * torch.randn_like(p) for p in clone.parameters()]
    update_module(clone, updates)
    names = [n for n, _ in rnn.named_parameters()]
    expected = functional_call(rnn, {n: p + u for n, p, u in zip(names, rnn.parameters(), updates)}, (x,))[0]
    out = clone(x)[0]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in rnn.parameters())
