"""Forward trajectories: every differentiable optimizer tracks torch.optim step for step."""

from __future__ import annotations

import copy

import pytest
import torch
from optim_cases import OPTIONS, case_id

import metaloop

WARMUP, STEPS = 3, 20


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(6, 3, generator=gen), torch.randn(6, 2, generator=gen), step % 3 == 1)
        for step in range(n)
    ]


def loss_fn(model, x: torch.Tensor, y: torch.Tensor, use_extra: bool) -> torch.Tensor:
    out = model(x, use_extra=use_extra)
    return ((out - y) ** 2).mean() + 0.1 * torch.sin(out).sum()


def make_opt(opt_type, kwargs, group2, model):
    first, second = model.groups()
    return opt_type([{"params": first}, {"params": second, **group2}], **kwargs)


@pytest.mark.parametrize("case", OPTIONS, ids=case_id)
def test_trajectory_matches_torch_optim(case, tied_net):
    """Branch after WARMUP live steps, unroll STEPS more: every step equals torch.optim's (1e-10)."""
    opt_type, kwargs, group2 = case
    data = batches(WARMUP + STEPS)
    reference = copy.deepcopy(tied_net)
    ref_opt = make_opt(opt_type, kwargs, group2, reference)
    live_opt = make_opt(opt_type, kwargs, group2, tied_net)

    def torch_step(model, opt, batch):
        opt.zero_grad()
        loss_fn(model, *batch).backward()
        opt.step()

    for batch in data[:WARMUP]:
        torch_step(reference, ref_opt, batch)
        torch_step(tied_net, live_opt, batch)

    with metaloop.innerloop_ctx(tied_net, live_opt) as (fmodel, diffopt):
        for step, batch in enumerate(data[WARMUP:]):
            torch_step(reference, ref_opt, batch)
            diffopt.step(loss_fn(fmodel, *batch))
            for expected, actual in zip(reference.parameters(), fmodel.parameters()):
                torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12, msg=lambda m: f"step {step}: {m}")
        assert len(list(fmodel.parameters())) == len(list(tied_net.parameters())) == 9
        # The unrolled weights stay on the graph back to time 0.
        final = sum(p.sum() for p in fmodel.parameters())
        grads = torch.autograd.grad(final, list(fmodel.parameters(time=0)), allow_unused=True)
        assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("case", OPTIONS[:1] + OPTIONS[6:7], ids=case_id)
def test_create_diff_optim_matches_fresh_torch_optim(case, tied_net):
    """create_diff_optim builds a fresh differentiable optimizer equal to a fresh torch one."""
    opt_type, kwargs, _ = case
    data = batches(5)
    reference = copy.deepcopy(tied_net)
    ref_opt = opt_type(reference.parameters(), **kwargs)
    fmodel = metaloop.monkeypatch(tied_net)
    diffopt = metaloop.create_diff_optim(opt_type, kwargs, fmodel=fmodel)
    for batch in data:
        ref_opt.zero_grad()
        loss_fn(reference, *batch).backward()
        ref_opt.step()
        diffopt.step(loss_fn(fmodel, *batch))
    for expected, actual in zip(reference.parameters(), fmodel.parameters()):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


def test_create_diff_optim_with_param_groups_and_explicit_params(tied_net):
    first, second = tied_net.groups()
    fast = [p.detach().clone().requires_grad_() for p in first + second]
    diffopt = metaloop.create_diff_optim(
        torch.optim.SGD, {"lr": 0.1}, params=[{"params": fast[:len(first)]}, {"params": fast[len(first):], "lr": 0.0}]
    )
    loss = sum((p**2).sum() for p in fast)
    new = diffopt.step(loss, params=fast)
    for p, q in zip(fast[: len(first)], new[: len(first)]):
        torch.testing.assert_close(q, p * 0.8)
    for p, q in zip(fast[len(first):], new[len(first):]):
        torch.testing.assert_close(q, p)


def test_untracked_and_frozen_parameters_are_left_alone(tied_net):
    """Parameters outside the optimizer or with requires_grad=False keep their fast weight."""
    tied_net.inp.weight.requires_grad_(False)
    opt = torch.optim.SGD(tied_net.head.parameters(), lr=0.1)
    with metaloop.innerloop_ctx(tied_net, opt) as (fmodel, diffopt):
        x = torch.randn(4, 3)
        before = list(fmodel.parameters())
        after = diffopt.step(fmodel(x).pow(2).sum())
    for name, (b, a) in zip([n for n, _ in tied_net.named_parameters()], zip(before, after)):
        if name.startswith("head"):
            assert not torch.equal(a, b), name
        else:
            assert a is b, name
    assert not after[0].requires_grad


def test_grad_callback_is_applied_in_reference_order(tied_net):
    opt = torch.optim.SGD(tied_net.parameters(), lr=1.0)
    seen = []

    def clip_to_zero(grads):
        seen.append(len(grads))
        return [None if g is None else torch.zeros_like(g) for g in grads]

    fmodel = metaloop.monkeypatch(tied_net)
    diffopt = metaloop.get_diff_optim(opt, tied_net.parameters(), fmodel=fmodel, grad_callback=clip_to_zero)
    x = torch.randn(4, 3)
    diffopt.step(fmodel(x).sum())
    for p0, p1 in zip(fmodel.parameters(time=0), fmodel.parameters()):
        torch.testing.assert_close(p1, p0)
    # A per-step callback replaces the constructor's.
    diffopt.step(fmodel(x).sum(), grad_callback=lambda gs: [None if g is None else 2 * g for g in gs])
    assert seen == [9]
    assert not torch.equal(fmodel.parameters(time=2).__next__(), fmodel.parameters(time=1).__next__())


def test_track_higher_grads_false_keeps_no_graph(tied_net):
    """Test mode: fast weights and state are leaves; history holds only the latest weights."""
    opt = torch.optim.Adam(tied_net.parameters(), lr=0.01)
    x = torch.randn(4, 3)
    with metaloop.innerloop_ctx(tied_net, opt, track_higher_grads=False) as (fmodel, diffopt):
        for _ in range(30):
            diffopt.step(fmodel(x).pow(2).mean())
        params = list(fmodel.parameters())
        assert all(p.grad_fn is None and p.requires_grad for p in params)
        assert len(fmodel._fast_params) == 1
        for group_state in diffopt.state:
            for state in group_state:
                assert all(v.grad_fn is None for v in state.values() if isinstance(v, torch.Tensor))
        with pytest.raises(ValueError, match="track_higher_grads=False"):
            fmodel.parameters(time=3)


def test_rule_runs_under_vmap_over_tasks():
    """The pure rules batch over a leading task dimension with torch.func.vmap."""
    from torch.func import vmap

    from metaloop.optim import OPTIMIZERS

    hp = {"lr": 0.1, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "amsgrad": True,
          "maximize": False, "decoupled_weight_decay": False}
    params = torch.randn(5, 3, 2)
    grads = torch.randn(5, 3, 2)
    rule = OPTIMIZERS[torch.optim.Adam]

    def two_steps(p, g):
        state = rule.init(p, hp)
        p, state = rule.update(p, g, state, hp)
        p, state = rule.update(p, g * 0.5, state, hp)
        return p

    batched = vmap(two_steps)(params, grads)
    looped = torch.stack([two_steps(p, g) for p, g in zip(params, grads)])
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-14)
