"""Learns Adam's learning rate by differentiating through 10 unrolled steps (a few seconds on CPU).

Run: ``python examples/hypergradient.py``. Prints the hypergradient d(query loss)/d(lr) and
checks it against a central finite difference.
"""

from __future__ import annotations

import torch
from torch import nn

import metaloop


def query_loss_after_unroll(model: nn.Module, lr: torch.Tensor, data: list[torch.Tensor]) -> torch.Tensor:
    """Returns the query loss after 10 differentiable Adam steps on the support set."""
    sx, sy, qx, qy = data
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    with metaloop.innerloop_ctx(model, opt, override={"lr": lr}) as (fmodel, diffopt):
        for _ in range(10):
            diffopt.step(nn.functional.mse_loss(fmodel(sx), sy))
        return nn.functional.mse_loss(fmodel(qx), qy)


def main() -> None:
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float64)
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    x = torch.linspace(-5, 5, 40).unsqueeze(1)
    y = 2.0 * torch.sin(x + 0.5)
    data = [x[::2], y[::2], x[1::2], y[1::2]]
    lr = torch.tensor(0.01, requires_grad=True)
    loss = query_loss_after_unroll(model, lr, data)
    (hypergrad,) = torch.autograd.grad(loss, lr)
    eps = 1e-6
    upper = query_loss_after_unroll(model, lr.detach() + eps, data).item()
    lower = query_loss_after_unroll(model, lr.detach() - eps, data).item()
    finite = (upper - lower) / (2 * eps)
    print(f"query loss after 10 Adam steps: {loss.item():.6f}")
    print(f"d loss / d lr (autograd):          {hypergrad.item():.8f}")
    print(f"d loss / d lr (finite difference): {finite:.8f}")
    for step in range(20):
        loss = query_loss_after_unroll(model, lr, data)
        (g,) = torch.autograd.grad(loss, lr)
        with torch.no_grad():
            lr.sub_(1e-4 * g).clamp_(min=1e-4)
    print(f"after 20 hypergradient steps: lr = {lr.item():.5f}, query loss = {loss.item():.6f}")


if __name__ == "__main__":
    main()
