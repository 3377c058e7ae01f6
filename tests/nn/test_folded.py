"""Tasks folded into channels (metaloop.nn.folded): each task's outputs and gradients equal its own network's, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metaloop.nn import MLP, Conv4, conv4_backbone
from metaloop.nn.folded import fold, fold_problems
from metaloop.nn.vision import CNN4, ResNet12


class _FlattenCall(nn.Module):
    """A network whose forward pass calls functions (torch.flatten, F.relu) rather than modules for them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, groups=2)
        self.norm = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4 * 8 * 8, 3, bias=False)

    def forward(self, x):
        return self.head(torch.flatten(F.relu(self.norm(self.conv(x))), 1))


NETS = {
    "conv-4": (lambda: Conv4(5, hidden=8), (1, 28, 28)),
    "conv-4, 84x84 RGB, no affine BatchNorm": (
        lambda: nn.Sequential(
            conv4_backbone(3, 8, 84, norm=lambda c: nn.BatchNorm2d(c, affine=False, track_running_stats=False)),
            nn.Linear(8 * 25, 5),
        ),
        (3, 84, 84),
    ),
    "grouped conv, GroupNorm, functions": (_FlattenCall, (2, 8, 8)),
    "MLP": (lambda: MLP(), (1,)),
    "MLP with BatchNorm1d and LayerNorm": (
        lambda: nn.Sequential(
            nn.Linear(3, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.Tanh(), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2)
        ),
        (3,),
    ),
    # layers acting on the last dimension of feature maps: each task's own weights, not its neighbours'
    "LayerNorm and linear layers over the width of maps": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1), nn.LayerNorm(8), nn.Linear(8, 5), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 8 * 5, 2)
        ),
        (1, 8, 8),
    ),
    "sequences (N, C, L): BatchNorm1d over channels, linear over length": (
        lambda: nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False), nn.Linear(6, 4), nn.Flatten(), nn.Linear(12, 2)),
        (3, 6),
    ),
    "strided conv, average pooling": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4, track_running_stats=False), nn.LeakyReLU(),
            nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)
        ),
        (1, 16, 16),
    ),
}


def _weights(net: nn.Module, tasks: int) -> dict[str, torch.Tensor]:
    """Returns each parameter perturbed differently for each task, ``(tasks, *shape)``."""
    gen = torch.Generator().manual_seed(1)
    return {
        n: (p.detach().expand(tasks, *p.shape) + 0.1 * torch.randn(tasks, *p.shape, generator=gen, dtype=p.dtype)).requires_grad_()
        for n, p in net.named_parameters()
    }


@pytest.mark.parametrize("name", list(NETS))
def test_each_task_gets_its_own_outputs_and_second_order_gradients(name):
    make, shape = NETS[name]
    torch.manual_seed(0)
    net = make().double()
    tasks = 3
    weights = _weights(net, tasks)
    x = torch.randn(tasks, 6, *shape, dtype=torch.float64)
    folded = fold(net)(weights, x)
    own = torch.stack([functional_call(net, {n: w[t] for n, w in weights.items()}, (x[t],)) for t in range(tasks)])
    torch.testing.assert_close(folded, own, rtol=0, atol=1e-12)

    # the gradient of a gradient (what MAML's meta-gradient needs), through every layer, per task
    def second_order(out: torch.Tensor) -> list[torch.Tensor]:
        first = torch.autograd.grad(out.square().sum(), list(weights.values()), create_graph=True)
        return list(torch.autograd.grad(sum(g.square().sum() for g in first), list(weights.values())))

    expected = second_order(own)
    scale = max(g.abs().max().item() for g in expected)  # a conv bias before BatchNorm: truly 0, rounding at this scale
    for a, b in zip(second_order(fold(net)(weights, x)), expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12 * scale)


@pytest.mark.parametrize("net, reason", [
    (lambda: CNN4(5), r"it has buffers \(features\.0\.normalize\.running_mean"),
    (lambda: nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2)), r"0 is a Conv1d, which is not among the folded layers"),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")), r"0 pads with 'reflect'"),
    (lambda: nn.Sequential(nn.Flatten(2)), r"0 flattens dims 2..-1, not 1..-1"),
    (lambda: ResNet12(5), r"it has buffers"),
])
def test_fold_names_what_it_cannot_fold(net, reason):
    model = net()
    assert fold_problems(model)
    with pytest.raises(ValueError, match=f"cannot run with tasks folded into channels: {reason}"):
        fold(model)


def test_data_dependent_control_flow_is_not_folded():
    class Branching(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(2, 2)

        def forward(self, x):
            return self.linear(x) if x.sum() > 0 else x

    (problem,) = fold_problems(Branching())
    assert problem.startswith("its forward pass cannot be traced (TraceError")


def test_a_method_call_other_than_flatten_is_not_folded():
    class Viewing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 2)

        def forward(self, x):
            return self.linear(x.view(-1, 4))

    assert fold_problems(Viewing()) == ["its forward pass calls view (call_method), which is not folded"]
