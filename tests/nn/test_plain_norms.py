"""Plain-operation normalization layers (metaloop/nn/plain_norms.py): the same values as PyTorch's, and vmapped
second-order meta-gradients equal to the task-by-task loop in float64."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from learner_options import with_inner
from metaloop.algorithms import InnerOptions
from metaloop.lightning import Classification, Conv4, MAMLPlusPlus, MetaLightningModule
from metaloop.nn import PerStepConv4, exact_norms
from metaloop.nn.plain_norms import batch_norm, instance_norm, layer_norm
from metaloop.optim.implicit import ImplicitOptions
from metaloop.tasks import Task

ADAM = functools.partial(torch.optim.Adam, lr=1e-3)


def test_plain_layers_equal_pytorchs_functionals():
    torch.manual_seed(0)
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64)
    w, b = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    mean, var = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    torch.testing.assert_close(batch_norm(x, None, None, w, b, True), F.batch_norm(x, None, None, w, b, True), rtol=0, atol=1e-12)
    torch.testing.assert_close(batch_norm(x, mean, var, w, b, False), F.batch_norm(x, mean, var, w, b, False), rtol=0, atol=1e-12)
    torch.testing.assert_close(batch_norm(x, None, None), F.batch_norm(x, None, None, training=True), rtol=0, atol=1e-12)
    torch.testing.assert_close(instance_norm(x, weight=w, bias=b), F.instance_norm(x, weight=w, bias=b), rtol=0, atol=1e-12)
    ln_w, ln_b = torch.randn(5, 5, dtype=torch.float64), torch.randn(5, 5, dtype=torch.float64)
    torch.testing.assert_close(layer_norm(x, (5, 5), ln_w, ln_b), F.layer_norm(x, (5, 5), ln_w, ln_b), rtol=0, atol=1e-12)


def test_exact_norms_routes_only_inside_the_block_and_leaves_running_statistics_to_pytorch():
    torch.manual_seed(0)
    tracked = nn.BatchNorm1d(3)
    x = torch.randn(8, 3)
    with exact_norms():
        tracked(x)  # training mode with running statistics: PyTorch's batch_norm, which updates them
        assert F.batch_norm is not batch_norm
    assert tracked.num_batches_tracked.item() == 1 and not torch.equal(tracked.running_mean, torch.zeros(3))
    bf16 = torch.randn(8, 3, 4, 4).bfloat16()
    with exact_norms():
        out = F.batch_norm(bf16, None, None, training=True)
    assert out.dtype == torch.bfloat16  # statistics in float32, the result in the input's dtype
    torch.testing.assert_close(out.float(), F.batch_norm(bf16.float(), None, None, training=True), rtol=0.02, atol=0.02)


def _sequential_vs_vmapped_second_order(model: nn.Module, plain: bool) -> tuple[list[Tensor], list[Tensor]]:
    """Returns the meta-gradients of 2 inner SGD steps on 3 tasks: task by task, and vmapped (under exact_norms or not)."""
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 6, 1, 6, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (3, 6), generator=gen)

    def task_loss(xi: Tensor, yi: Tensor, batched: bool) -> Tensor:
        weights = params
        for _ in range(2):
            loss = lambda w: F.cross_entropy(functional_call(model, w, (xi,)), yi)  # noqa: E731
            if batched:
                grads = grad(loss)(weights)
            else:
                grads = dict(zip(weights, torch.autograd.grad(loss(weights), list(weights.values()), create_graph=True)))
            weights = {k: w - 0.4 * grads[k] for k, w in weights.items()}
        return F.cross_entropy(functional_call(model, weights, (xi,)), yi)

    sequential = torch.autograd.grad(sum(task_loss(a, b, False) for a, b in zip(x, y)), list(params.values()))
    with exact_norms() if plain else torch.enable_grad():
        losses = vmap(functools.partial(task_loss, batched=True))(x, y)
    return list(sequential), list(torch.autograd.grad(losses.sum(), list(params.values())))


NORMS = {
    "batch": lambda: nn.BatchNorm2d(4, track_running_stats=False),
    "batch, not affine": lambda: nn.BatchNorm2d(4, affine=False, track_running_stats=False),
    "instance": lambda: nn.InstanceNorm2d(4, affine=True),
    "layer": lambda: nn.LayerNorm([4, 6, 6]),
    "group": lambda: nn.GroupNorm(2, 4),
}


def _norm_net(norm: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), NORMS[norm](), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)).double()


@pytest.mark.parametrize("norm", list(NORMS))
def test_vmapped_second_order_through_each_norm_equals_task_by_task_under_exact_norms(norm):
    sequential, vmapped = _sequential_vs_vmapped_second_order(_norm_net(norm), plain=True)
    for a, b in zip(vmapped, sequential):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_pytorchs_own_vmap_rule_is_wrong_where_exact_norms_is_right():
    """The bug routed around (benchmarks/vmap_batchnorm_bug.py): BatchNorm's vmapped second order differs by percents."""
    sequential, vmapped = _sequential_vs_vmapped_second_order(_norm_net("batch"), plain=False)
    worst = max(((a - b).norm() / b.norm().clamp_min(1e-12)).item() for a, b in zip(vmapped[2:], sequential[2:]))
    assert worst > 1e-3
    assert sequential[1].abs().max() < 1e-12 < vmapped[1].abs().max()  # the conv bias before BatchNorm: truly zero


def _omniglot_like(tasks: int = 3, seed: int = 0) -> Task:
    gen = torch.Generator().manual_seed(seed)
    return Task(
        torch.rand(tasks, 5, 1, 28, 28, generator=gen, dtype=torch.float64),
        torch.arange(5).expand(tasks, -1).contiguous(),
        torch.rand(tasks, 10, 1, 28, 28, generator=gen, dtype=torch.float64),
        torch.arange(5).repeat_interleave(2).expand(tasks, -1).contiguous(),
    )


def _meta_gradient(make: functools.partial, batch_tasks: str) -> tuple[Tensor, Tensor]:
    torch.manual_seed(0)
    module = make(batch_tasks=batch_tasks).double()
    assert module.batched == (batch_tasks == "vmap")
    loss, _ = module.meta_gradient(_omniglot_like())
    return loss, torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


BN_WEIGHTS = r"^(features\.(0|4|8|12)\.|head\.)"  # conv and head weights: BatchNorm's affine weights frozen in the inner loop
CONV4 = {
    "sgd, second order": {},
    "sgd, first order": {"first_order": True},
    "adam, second order": {"inner_optim": functools.partial(torch.optim.Adam, lr=0.05)},
    "batchnorm weights frozen": {"adapt_params": BN_WEIGHTS},
    "truncated": {"meta_grad": "truncated", "truncate": 1},
    "implicit": {"meta_grad": "implicit", "implicit": ImplicitOptions(lam=2.0, maxiter=3)},
}


@pytest.mark.parametrize("case", list(CONV4))
def test_conv4_meta_gradient_vmapped_equals_task_by_task_in_float64(case):
    """Finn et al.'s conv-4 (BatchNorm on batch statistics), 2 inner steps: the vmapped path is exact to 1e-10."""
    options = {"inner_optim": functools.partial(torch.optim.SGD, lr=0.4), "inner_steps": 2, **CONV4[case]}
    make = functools.partial(lambda **kw: MetaLightningModule(Conv4(5, hidden=8), Classification(), outer_optim=ADAM, **with_inner(kw)), **options)
    (loss_s, grad_s), (loss_v, grad_v) = _meta_gradient(make, "sequential"), _meta_gradient(make, "vmap")
    torch.testing.assert_close(loss_v, loss_s, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_v, grad_s, rtol=0, atol=1e-10 * grad_s.abs().max().item())


def test_mamlpp_per_step_batchnorm_weights_vmapped_equal_task_by_task_in_float64():
    """MAML++ with per-step BatchNorm weights (BNWB) on batch statistics: no buffers, so it vmaps, exactly."""
    def make(batch_tasks: str) -> MAMLPlusPlus:
        model = PerStepConv4(5, steps=2, hidden=8, per_step_weights=True, per_step_stats=False)
        return MAMLPlusPlus(model, Classification(), InnerOptions(steps=2, batch_tasks=batch_tasks), functools.partial(torch.optim.SGD, lr=0.4), ADAM, msl_anneal_steps=10, first_order_steps=0)
    (loss_s, grad_s), (loss_v, grad_v) = _meta_gradient(make, "sequential"), _meta_gradient(make, "vmap")
    torch.testing.assert_close(loss_v, loss_s, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_v, grad_s, rtol=0, atol=1e-10 * grad_s.abs().max().item())


def test_vmapped_evaluation_equals_task_by_task():
    make = functools.partial(lambda **kw: MetaLightningModule(Conv4(5, hidden=8), Classification(), inner_optim=functools.partial(torch.optim.SGD, lr=0.4), outer_optim=ADAM, **with_inner(kw)))
    results = {}
    for batch_tasks in ("sequential", "vmap"):
        torch.manual_seed(0)
        module = make(batch_tasks=batch_tasks).double()
        support_x, support_y, query_x, query_y = _omniglot_like()
        results[batch_tasks] = module.adapt((support_x[0], support_y[0]), 2)(query_x[0])
        chunks = [r for _, r in module.over_tasks(functools.partial(module.evaluate_task, None), _omniglot_like())]
        results[batch_tasks + " eval"] = chunks
    torch.testing.assert_close(results["vmap"], results["sequential"], rtol=0, atol=1e-12)
    for when in results["vmap eval"][0]:  # metrics before and after adaptation, per task
        for key in results["vmap eval"][0][when]:
            vmapped = torch.cat([chunk[when][key] for chunk in results["vmap eval"]])
            sequential = torch.cat([chunk[when][key] for chunk in results["sequential eval"]])
            torch.testing.assert_close(vmapped, sequential, rtol=0, atol=1e-10)
