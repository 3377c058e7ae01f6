"""MAML meta-steps implemented six ways, on the sinusoid and Omniglot workloads.

Each implementation turns a :class:`Workload` into a ``meta_step()`` closure that leaves the
meta-gradient (the mean query loss over tasks, after ``K`` differentiable inner steps) in
``model.parameters()``'s ``.grad``. All use the same model object, so their gradients can be
compared before they are timed. The two "Lightning" rows build a real
:class:`~metaloop.algorithms.MetaLightningModule` around the model; their gradient is its
:meth:`~metaloop.algorithms.MetaLightningModule.meta_gradient`, and their time is its
``training_step`` run by a ``lightning.Trainer`` as ``metaloop fit`` runs it (:func:`fit_step_seconds`:
outer step, logging and the loop included).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

import metaloop
from metaloop.algorithms import InnerOptions
from metaloop.algorithms import Classification, MetaLightningModule, Objective, Regression
from metaloop.tasks import Task

MetaStep = Callable[[], None]


def sinusoid_mlp() -> nn.Module:
    """Returns the 1-40-40-1 ReLU MLP of Finn et al. 2017."""
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))


def omniglot_convnet(n_ways: int = 5) -> nn.Module:
    """Returns the 4-block conv net of Finn et al. 2017 (BatchNorm with batch statistics)."""
    blocks: list[nn.Module] = []
    channels = 1
    for _ in range(4):
        blocks += [
            nn.Conv2d(channels, 64, 3, padding=1),
            nn.BatchNorm2d(64, track_running_stats=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        channels = 64
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(64, n_ways))


@dataclass
class Workload:
    """One benchmark configuration: a model, a meta-batch of tasks, and an inner loop."""

    name: str
    model: nn.Module
    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    steps: int
    inner: str  # "sgd" or "adam"
    lr: float
    loss: Callable[[Tensor, Tensor], Tensor]
    objective: Objective

    @property
    def tasks(self) -> int:
        return self.support_x.shape[0]

    def inner_optimizer(self, params=None) -> torch.optim.Optimizer:
        params = self.model.parameters() if params is None else params
        if self.inner == "sgd":
            return torch.optim.SGD(params, lr=self.lr)
        return torch.optim.Adam(params, lr=self.lr)


def mse(out: Tensor, y: Tensor) -> Tensor:
    return ((out - y) ** 2).mean()


def cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(out, y)


def sinusoid_workload(tasks: int, steps: int, inner: str, seed: int = 0) -> Workload:
    """Returns workload 1: sinusoid MAML, 10 support and 10 query points per task."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    amp = torch.rand(tasks, 1, 1, generator=gen) * 4.9 + 0.1
    phase = torch.rand(tasks, 1, 1, generator=gen) * math.pi
    xs = torch.rand(tasks, 20, 1, generator=gen) * 10 - 5
    ys = amp * torch.sin(xs - phase)
    lr = 0.01 if inner == "sgd" else 0.001
    return Workload(f"sinusoid T={tasks} K={steps} {inner}", sinusoid_mlp(), xs[:, :10], ys[:, :10],
                    xs[:, 10:], ys[:, 10:], steps, inner, lr, mse, Regression())


def omniglot_workload(tasks: int, steps: int, inner: str = "sgd", seed: int = 0) -> Workload:
    """Returns workload 2: Omniglot-shaped MAML, 5-way 1-shot with 15 queries (random images)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ways, shots, queries = 5, 1, 15
    sx = torch.rand(tasks, ways * shots, 1, 28, 28, generator=gen)
    qx = torch.rand(tasks, ways * queries, 1, 28, 28, generator=gen)
    sy = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).contiguous()
    qy = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).contiguous()
    lr = 0.4 if inner == "sgd" else 0.001
    return Workload(f"omniglot T={tasks} K={steps} {inner}", omniglot_convnet(ways), sx, sy, qx, qy,
                    steps, inner, lr, cross_entropy, Classification())


# -- implementations -----------------------------------------------------------------------
def _context_impl(library) -> Callable[[Workload, bool], MetaStep]:
    def make(w: Workload, track_higher_grads: bool = True) -> MetaStep:
        opt = w.inner_optimizer()

        def meta_step() -> None:
            for i in range(w.tasks):
                with library.innerloop_ctx(w.model, opt, copy_initial_weights=False,
                                           track_higher_grads=track_higher_grads) as (fmodel, diffopt):
                    for _ in range(w.steps):
                        diffopt.step(w.loss(fmodel(w.support_x[i]), w.support_y[i]))
                    (w.loss(fmodel(w.query_x[i]), w.query_y[i]) / w.tasks).backward()

        return meta_step

    return make


def higher_impl(w: Workload, track_higher_grads: bool = True) -> MetaStep:
    """higher.innerloop_ctx, as its README shows."""
    import higher

    return _context_impl(higher)(w, track_higher_grads)


def metaloop_ctx_impl(w: Workload, track_higher_grads: bool = True) -> MetaStep:
    """metaloop.innerloop_ctx: the same code with ``import metaloop as higher``."""
    return _context_impl(metaloop)(w, track_higher_grads)


def lightning_module(w: Workload, batch_tasks: str, memory_format: str = "auto", **inner_options) -> MetaLightningModule:
    """Returns the :class:`MetaLightningModule` of workload ``w`` (its model, inner optimizer, steps), as ``metaloop fit`` builds it.

    ``inner_options`` are further :class:`~metaloop.algorithms.InnerOptions` fields (``first_order=True``...).
    """
    rule = torch.optim.SGD if w.inner == "sgd" else torch.optim.Adam
    inner = InnerOptions(steps=w.steps, batch_tasks=batch_tasks, **inner_options)
    adam = functools.partial(torch.optim.Adam, lr=1e-3)
    return MetaLightningModule(w.model, w.objective, inner, functools.partial(rule, lr=w.lr), adam, memory_format=memory_format)


def fit_step_seconds(module: MetaLightningModule, batch: Task, steps: int, callbacks: list | None = None, **trainer) -> list[float]:
    """Returns the seconds of meta-steps 2 .. ``steps + 1`` of ``Trainer.fit`` on ``batch`` repeated: training_step as ``metaloop fit`` runs it.

    Each meta-step is Lightning's whole loop iteration (fetching the batch, ``training_step`` with its
    manual backward and outer optimizer step, logging, callbacks); the first (warm-up) is not counted.
    ``trainer`` adds Trainer arguments (``accelerator``, ``precision``); ``callbacks`` run before the timer.
    """
    import lightning

    from metaloop.lightning.callbacks import MetaStepTimer

    timer = MetaStepTimer()
    fit = lightning.Trainer(
        max_steps=steps + 1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[*(callbacks or []), timer], **{"accelerator": "cpu", **trainer},
    )
    fit.fit(module, train_dataloaders=torch.utils.data.DataLoader(_Repeat(batch), batch_size=None))
    return timer.durations


class _Repeat(torch.utils.data.IterableDataset):
    """Yields one meta-batch for ever."""

    def __init__(self, batch: Task) -> None:
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


def _lightning_impl(batch_tasks: str) -> Callable[[Workload, bool], MetaStep]:
    def make(w: Workload, track_higher_grads: bool = True) -> MetaStep:
        module = lightning_module(w, batch_tasks)
        batch = Task(w.support_x, w.support_y, w.query_x, w.query_y)

        def meta_step() -> None:
            if track_higher_grads:
                module.meta_gradient(batch)  # training_step's meta-gradient (the timed rows run training_step: run.py)
            else:  # test mode: adapt without a graph, score the query set
                for i in range(w.tasks):
                    fmodel = module.adapt((w.support_x[i], w.support_y[i]), w.steps)
                    with torch.no_grad():
                        w.loss(fmodel(w.query_x[i]), w.query_y[i])

        meta_step.fit_seconds = lambda repeats: fit_step_seconds(lightning_module(w, batch_tasks), batch, repeats)  # type: ignore[attr-defined]
        return meta_step

    return make


lightning_sequential_impl = _lightning_impl("sequential")
lightning_sequential_impl.__doc__ = "MetaLightningModule(batch_tasks='sequential'): training_step through a Trainer, task by task."
lightning_vmap_impl = _lightning_impl("vmap")
lightning_vmap_impl.__doc__ = "MetaLightningModule(batch_tasks='vmap'): training_step through a Trainer, all tasks at once under torch.func.vmap."


def plain_vmap_impl(w: Workload, track_higher_grads: bool = True) -> MetaStep:
    """Hand-written plain PyTorch with torch.func: vmap over tasks of ``K`` inner SGD steps by ``grad``, one backward.

    Refused for models with BatchNorm: second-order gradients through batch statistics are wrong
    under vmap in PyTorch 2.13 (see :func:`metaloop.optim.loop.vmap_problems`).
    """
    if w.inner != "sgd" or any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in w.model.modules()):
        raise ValueError("plain vmap: written for inner SGD on models without BatchNorm (second order through "
                         "batch statistics is wrong under vmap in torch 2.13)")
    names = [n for n, _ in w.model.named_parameters()]

    def task_loss(params: dict[str, Tensor], sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
        for _ in range(w.steps):
            g = torch.func.grad(lambda p: w.loss(functional_call(w.model, p, (sx,)), sy))(params)
            params = {n: params[n] - w.lr * (g[n] if track_higher_grads else g[n].detach()) for n in names}
        return w.loss(functional_call(w.model, params, (qx,)), qy)

    def meta_step() -> None:
        params = dict(w.model.named_parameters())
        losses = torch.func.vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(params, w.support_x, w.support_y, w.query_x, w.query_y)
        losses.mean().backward()

    return meta_step


def torchopt_impl(w: Workload, track_higher_grads: bool = True) -> MetaStep:
    """torchopt's MetaSGD / MetaAdam with extract/recover_state_dict, as its MAML example."""
    import torchopt

    if w.inner == "sgd":
        opt = torchopt.MetaSGD(w.model, lr=w.lr)
    else:
        opt = torchopt.MetaAdam(w.model, lr=w.lr)

    def meta_step() -> None:
        net_state = torchopt.extract_state_dict(w.model, by="reference", detach_buffers=True)
        opt_state = torchopt.extract_state_dict(opt)
        for i in range(w.tasks):
            for _ in range(w.steps):
                opt.step(w.loss(w.model(w.support_x[i]), w.support_y[i]))
            (w.loss(w.model(w.query_x[i]), w.query_y[i]) / w.tasks).backward()
            torchopt.recover_state_dict(w.model, net_state)
            torchopt.recover_state_dict(opt, opt_state)

    return meta_step


def reference_impl(w: Workload, track_higher_grads: bool = True) -> MetaStep:
    """Hand-written plain PyTorch: functional_call + autograd.grad + torch._foreach_* updates."""
    names = [n for n, _ in w.model.named_parameters()]
    group = w.inner_optimizer([torch.zeros(1)]).param_groups[0]
    beta1, beta2 = group.get("betas", (0.9, 0.999))
    eps = group.get("eps", 1e-8)

    def meta_step() -> None:
        for i in range(w.tasks):
            params = list(w.model.parameters())
            m = [torch.zeros_like(p) for p in params]
            v = [torch.zeros_like(p) for p in params]
            for t in range(1, w.steps + 1):
                loss = w.loss(functional_call(w.model, dict(zip(names, params)), (w.support_x[i],)), w.support_y[i])
                grads = torch.autograd.grad(loss, params, create_graph=track_higher_grads)
                if w.inner == "sgd":
                    params = torch._foreach_sub(params, torch._foreach_mul(grads, w.lr))
                else:
                    m = torch._foreach_add(torch._foreach_mul(m, beta1), torch._foreach_mul(grads, 1 - beta1))
                    v = torch._foreach_add(torch._foreach_mul(v, beta2),
                                           torch._foreach_mul(torch._foreach_mul(grads, grads), 1 - beta2))
                    # + 1e-30 keeps sqrt's derivative finite where a gradient is exactly zero.
                    root = torch._foreach_sqrt(torch._foreach_add(v, 1e-30))
                    denom = torch._foreach_add(torch._foreach_div(root, math.sqrt(1 - beta2**t)), eps)
                    params = torch._foreach_sub(params, torch._foreach_mul(torch._foreach_div(m, denom), w.lr / (1 - beta1**t)))
                if not track_higher_grads:
                    params = [p.detach().requires_grad_() for p in params]
            query = functional_call(w.model, dict(zip(names, params)), (w.query_x[i],))
            (w.loss(query, w.query_y[i]) / w.tasks).backward()

    return meta_step


IMPLEMENTATIONS: dict[str, Callable[[Workload, bool], MetaStep]] = {
    "higher": higher_impl,
    "torchopt": torchopt_impl,
    "plain PyTorch": reference_impl,
    "plain PyTorch vmap": plain_vmap_impl,
    "metaloop ctx": metaloop_ctx_impl,
    "Lightning sequential": lightning_sequential_impl,
    "Lightning vmap": lightning_vmap_impl,
}
