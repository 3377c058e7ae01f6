"""Per-step BatchNorm (MAML++'s BNWB and BNRS): step-indexed weights and running statistics, and the conv net on it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metaloop.nn import PerStepBatchNorm2d, PerStepConv4

STEPS = 3


def numbered_norm(**kwargs) -> PerStepBatchNorm2d:
    """Returns a per-step BatchNorm of 2 channels whose slot k has weight k + 1 and bias -k (distinct per slot)."""
    norm = PerStepBatchNorm2d(2, STEPS, **kwargs).double()
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, STEPS + 2, dtype=torch.float64)[:, None].expand(-1, 2))
        norm.bias.copy_(-torch.arange(0.0, STEPS + 1, dtype=torch.float64)[:, None].expand(-1, 2))
    return norm


def by_hand(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: float, bias: float) -> torch.Tensor:
    return (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + 1e-5) * weight + bias


@pytest.mark.parametrize("step", range(STEPS + 1))
def test_training_normalises_by_the_batch_with_the_weights_of_the_step_and_updates_only_its_statistics(step):
    norm = numbered_norm()
    x = torch.randn(6, 2, 4, 4, dtype=torch.float64) * 3 + 1
    out = norm(x, step)
    mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(out, by_hand(x, mean, var, step + 1.0, -float(step)), rtol=1e-10, atol=1e-10)
    unbiased = x.var(dim=(0, 2, 3), unbiased=True)
    for slot in range(STEPS + 1):
        expected_mean = 0.1 * mean if slot == step else torch.zeros(2, dtype=torch.float64)
        expected_var = 0.9 + 0.1 * unbiased if slot == step else torch.ones(2, dtype=torch.float64)
        torch.testing.assert_close(norm.running_mean[slot], expected_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(norm.running_var[slot], expected_var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("step", range(STEPS + 1))
def test_evaluation_normalises_with_the_running_statistics_of_the_step(step):
    norm = numbered_norm()
    with torch.no_grad():
        norm.running_mean.copy_(torch.arange(STEPS + 1, dtype=torch.float64)[:, None].expand(-1, 2))
        norm.running_var.copy_(torch.arange(1.0, STEPS + 2, dtype=torch.float64)[:, None].expand(-1, 2) ** 2)
    saved = norm.running_mean.clone(), norm.running_var.clone()
    x = torch.randn(6, 2, 4, 4, dtype=torch.float64)
    out = norm.eval()(x, step)
    mean, var = torch.full((2,), float(step), dtype=torch.float64), torch.full((2,), (step + 1.0) ** 2, dtype=torch.float64)
    torch.testing.assert_close(out, by_hand(x, mean, var, step + 1.0, -float(step)), rtol=1e-10, atol=1e-10)
    assert torch.equal(norm.running_mean, saved[0]) and torch.equal(norm.running_var, saved[1])


def test_transductive_evaluation_normalises_by_the_batch_and_leaves_the_statistics_alone():
    norm = numbered_norm(eval_stats="batch").eval()
    x = torch.randn(6, 2, 4, 4, dtype=torch.float64)
    out = norm(x, 1)
    torch.testing.assert_close(out, by_hand(x, x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False), 2.0, -1.0))
    assert torch.equal(norm.running_mean, torch.zeros(STEPS + 1, 2, dtype=torch.float64))


def test_shared_weights_and_no_statistics_are_batchnorm_of_the_batch_with_no_buffers():
    norm = PerStepBatchNorm2d(2, STEPS, per_step_weights=False, per_step_stats=False).double()
    assert norm.weight.shape == (2,) and not list(norm.buffers())
    x = torch.randn(6, 2, 4, 4, dtype=torch.float64)
    expected = F.batch_norm(x, None, None, norm.weight, norm.bias, training=True)
    for step in range(STEPS + 1):
        torch.testing.assert_close(norm.eval()(x, step), expected, rtol=0, atol=0)


def test_steps_past_the_last_slot_use_the_last_one():
    norm = numbered_norm().eval()
    x = torch.randn(6, 2, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(norm(x, STEPS + 4), norm(x, STEPS), rtol=0, atol=0)
    assert norm.slot(STEPS + 4) == STEPS


@pytest.mark.parametrize("kwargs,message", [
    ({"steps": 0}, "steps=0"),
    ({"num_features": 0}, "num_features=0"),
    ({"eval_stats": "mean"}, "eval_stats='mean'"),
])
def test_bad_arguments_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PerStepBatchNorm2d(**{"num_features": 2, "steps": STEPS, **kwargs})
    with pytest.raises(ValueError, match="step=-1"):
        PerStepBatchNorm2d(2, STEPS)(torch.randn(2, 2, 1, 1), -1)


def test_conv4_names_its_parts_and_gives_logits_per_step():
    torch.manual_seed(0)
    net = PerStepConv4(5, steps=STEPS, hidden=8, image_size=16)
    names = [n for n, _ in net.named_parameters()]
    assert names[:4] == ["blocks.0.conv.weight", "blocks.0.conv.bias", "blocks.0.norm.weight", "blocks.0.norm.bias"]
    assert names[-2:] == ["head.weight", "head.bias"] and net.blocks[0]["norm"].weight.shape == (STEPS + 1, 8)
    x = torch.rand(5, 1, 16, 16)
    with torch.no_grad():
        net.blocks[2]["norm"].weight[1].mul_(3.0)  # slot 1 differs from the others
    assert net(x, 0).shape == (5, 5)
    assert not torch.allclose(net(x, 1), net(x, 0)) and torch.allclose(net(x, 2), net(x, 0))
    with pytest.raises(ValueError, match="out_features=None"):
        PerStepConv4(None, steps=STEPS)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="image_size=8"):
        PerStepConv4(5, steps=STEPS, image_size=8)
