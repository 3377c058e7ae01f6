"""Fixtures for the differentiable-optimizer tests: float64 everywhere, small models."""

from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def float64():
    """Runs each optimizer test in float64 (torch.optim's scalar state follows the default dtype)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


class TiedNet(nn.Module):
    """A model with a tied weight (used twice) and a layer that only some steps use."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.hidden = nn.Linear(4, 4)
        self.hidden2 = nn.Linear(4, 4)
        self.hidden2.weight = self.hidden.weight
        self.extra = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, use_extra: bool = False) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.hidden(h))
        h = torch.tanh(self.hidden2(h))
        if use_extra:
            h = h + torch.tanh(self.extra(h))
        return self.head(h)

    def groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """Two parameter groups: the body, and the extra layer plus the head."""
        first = [*self.inp.parameters(), *self.hidden.parameters(), self.hidden2.bias]
        second = [*self.extra.parameters(), *self.head.parameters()]
        return first, second


@pytest.fixture
def tied_net() -> TiedNet:
    torch.manual_seed(0)
    return TiedNet()
