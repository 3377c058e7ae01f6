"""learn2learn.utils: the DiCE magic box, parameter and distribution cloning, accuracy, config flattening, warn_once."""

from __future__ import annotations

import argparse
import dataclasses
import warnings

import pytest
import torch
from torch import nn

from metaloop.compat import learn2learn as l2l

F64 = torch.float64


def test_magic_box_is_one_with_the_gradient_of_its_argument_at_every_order():
    x = torch.tensor([0.3, -1.2], dtype=F64, requires_grad=True)
    box = l2l.magic_box(x * x)
    torch.testing.assert_close(box, torch.ones(2, dtype=F64), rtol=0, atol=0)
    (g,) = torch.autograd.grad(box.sum(), x, create_graph=True)
    torch.testing.assert_close(g, 2 * x.detach(), rtol=0, atol=1e-15)  # d/dx exp(f - stop(f)) = f'
    (h,) = torch.autograd.grad(g.sum(), x)
    torch.testing.assert_close(h, 4 * x.detach() ** 2 + 2, rtol=0, atol=1e-12)  # f'' + f'^2
    assert l2l.magic_box(3.0) == 3.0


def test_clone_parameters_keep_the_graph_and_copy_the_values():
    params = [torch.randn(2, requires_grad=True), torch.randn(3, requires_grad=True)]
    clones = l2l.clone_parameters(params)
    assert all(c is not p and torch.equal(c, p) and c.grad_fn is not None for c, p in zip(clones, params))
    named = l2l.clone_named_parameters(dict(nn.Linear(2, 1).named_parameters()))
    assert set(named) == {"weight", "bias"} and all(t.grad_fn is not None for t in named.values())
    sum(c.sum() for c in clones).backward()
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in params)


def test_clone_distribution_is_a_differentiable_copy_and_detach_distribution_cuts_it():
    loc = torch.zeros(3, requires_grad=True)
    scale = torch.ones(3)
    dist = torch.distributions.Normal(loc * 2, scale)
    clone = l2l.clone_distribution(dist)
    assert clone is not dist and clone.loc is not dist.loc and torch.equal(clone.loc, dist.loc)
    assert clone.scale is not dist.scale and torch.equal(clone.scale, scale)
    clone.log_prob(torch.ones(3)).sum().backward()
    torch.testing.assert_close(loc.grad, torch.full((3,), 2.0))
    assert l2l.detach_distribution(clone) is clone
    assert not clone.loc.requires_grad
    assert dist.loc.requires_grad  # the original keeps its graph


def test_accuracy_is_the_fraction_of_correct_argmaxes():
    preds = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    acc = l2l.accuracy(preds, torch.tensor([1, 0, 0, 0]))
    assert acc.dtype == torch.float32 and acc.item() == 0.75


@dataclasses.dataclass
class Inner:
    lr: float = 0.1


@dataclasses.dataclass
class Outer:
    inner: Inner = dataclasses.field(default_factory=Inner)
    steps: int = 5


def test_flatten_config_flattens_namespaces_dataclasses_and_dicts():
    assert l2l.flatten_config(argparse.Namespace(a=1, b={"c": 2})) == {"a": 1, "b.c": 2}
    assert l2l.flatten_config(Outer()) == {"inner.lr": 0.1, "steps": 5}
    assert l2l.flatten_config({"x": {"y": {"z": 3}}}) == {"x.y.z": 3}


def test_warn_once_warns_once_per_message_and_raises_for_errors():
    warn = type(l2l.utils.warn_once)()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn("careful")
        warn("careful")
        warn("old", severity="deprecation")
    assert [(str(w.message), w.category) for w in caught] == [("careful", UserWarning), ("old", DeprecationWarning)]
    with pytest.raises(RuntimeError, match="broken"):
        warn("broken", severity="error")
    with pytest.raises(ValueError, match="severity='loud' is not one of"):
        warn("x", severity="loud")
