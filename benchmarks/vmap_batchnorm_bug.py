"""PyTorch's vmap gets second-order gradients through BatchNorm wrong; metaloop.nn.exact_norms gets them right.

``python -m benchmarks.vmap_batchnorm_bug``: float64, conv-BatchNorm-linear net, 4 tasks, 2 inner SGD steps, the
meta-gradient of each tensor vmapped (PyTorch's batch_norm, then plain-operation BatchNorm) against the task-by-task loop.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from metaloop.nn import exact_norms

torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                    nn.Flatten(), nn.Linear(4 * 36, 3)).double()
params = dict(net.named_parameters())
x, y = torch.randn(4, 6, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (4, 6))


def query_loss(xi, yi, inner_grad):  # two inner SGD steps on the task's images, then the loss at the adapted weights
    loss, w = (lambda w: F.cross_entropy(functional_call(net, w, (xi,)), yi)), params
    for _ in range(2):
        w = {k: v - 0.4 * g for (k, v), g in zip(w.items(), inner_grad(loss, w))}
    return loss(w)


def meta_grad(loss):
    return torch.autograd.grad(loss, list(params.values()))


autograd_grads = lambda loss, w: torch.autograd.grad(loss(w), list(w.values()), create_graph=True)  # noqa: E731
func_grads = lambda loss, w: list(grad(loss)(w).values())  # noqa: E731
loop = meta_grad(sum(query_loss(xi, yi, autograd_grads) for xi, yi in zip(x, y)))
native = meta_grad(vmap(lambda xi, yi: query_loss(xi, yi, func_grads))(x, y).sum())
with exact_norms():
    plain = meta_grad(vmap(lambda xi, yi: query_loss(xi, yi, func_grads))(x, y).sum())
print(f"{'tensor':<12} {'|task by task|':>15} {'|vmap - loop|':>15} {'|exact - loop|':>15}")
for name, a, b, c in zip(params, loop, native, plain):
    print(f"{name:<12} {a.norm():15.3e} {(b - a).norm():15.3e} {(c - a).norm():15.3e}")
