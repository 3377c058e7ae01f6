"""bfloat16 autocast in the inner loop, the refused precisions, and channels-last memory (metaloop/lightning/precision.py)."""

from __future__ import annotations

import functools

import lightning
import pytest
import torch
from torch import Tensor, nn

from metaloop.algorithms import InnerOptions
from metaloop.lightning import (
    MLP,
    Classification,
    Conv4,
    MetaDataModule,
    MetaLightningModule,
    PerLayer,
    PrototypicalModule,
    Regression,
    conv4_backbone,
)
from metaloop.lightning.precision import (
    ACCEPTED_PRECISIONS,
    auto_memory_format,
    auto_precision,
    bf16_fast,
    check_precision,
    resolve_memory_format,
    to_memory_format,
)
from metaloop.nn import PrototypicalClassifier, SVClassifier
from metaloop.optim import get_rule
from metaloop.optim.rules import apply_rule
from metaloop.tasks import EpisodeSampler, Omniglot, SinusoidTasks, Task, sample_task
from metaloop.compat.learn2learn.optim.learnable_optimizer import LearnableOptimizer, ParameterUpdate
from metaloop.transforms import KroneckerTransform, MetaCurvatureTransform, ModuleTransform, TransformOptimizer
from metaloop.nn import KroneckerLinear
import metaloop.lightning.precision as precision_module

ADAM = functools.partial(torch.optim.Adam, lr=1e-3)


def omniglot_tasks(tasks: int = 2, queries: int = 3, seed: int = 0) -> Task:
    """Returns an Omniglot-shaped 5-way 1-shot meta-batch of random images (what the conv net's arithmetic sees)."""
    gen = torch.Generator().manual_seed(seed)
    return Task(
        torch.rand(tasks, 5, 1, 28, 28, generator=gen),
        torch.arange(5).expand(tasks, -1).contiguous(),
        torch.rand(tasks, 5 * queries, 1, 28, 28, generator=gen),
        torch.arange(5).repeat_interleave(queries).expand(tasks, -1).contiguous(),
    )


def sinusoid_tasks(tasks: int = 8, seed: int = 0) -> Task:
    """Returns ``tasks`` sinusoid tasks of maml_sinusoid.yaml (10 support and 10 query points)."""
    return _stack([sample_task(SinusoidTasks(k_shots=10, k_queries=10), "train", seed, i) for i in range(tasks)])


def bundled_omniglot_tasks(tasks: int = 4, seed: int = 0) -> Task:
    """Returns ``tasks`` 5-way 1-shot tasks (15 queries) of the bundled Omniglot characters, as maml_omniglot.yaml samples them."""
    source = EpisodeSampler(Omniglot(image_size=28), n_ways=5, k_shots=1, k_queries=15, splits=[0.7, 0.15, 0.15],
                            split_by="class", rotations=[0, 90, 180, 270])
    return _stack([sample_task(source, "train", seed, i) for i in range(tasks)])


def _stack(tasks: list[Task]) -> Task:
    return Task(*(torch.stack(field) for field in zip(*tasks)))


def meta_gradient(module: MetaLightningModule, batch: Task, bf16: bool) -> Tensor:
    """Returns the flattened meta-gradient of all trainable parameters, under bfloat16 autocast or not."""
    module.zero_grad(set_to_none=True)
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        module.meta_gradient(batch)
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


def _transform(factory: object) -> functools.partial:
    return functools.partial(TransformOptimizer, transform=factory)


CASES = {
    # (model, objective, inner optimizer (with its lr), inner steps, batch_tasks, tasks of a seed)
    "omniglot conv4": (lambda: Conv4(5), Classification(), functools.partial(torch.optim.SGD, lr=0.4), 1, "sequential", bundled_omniglot_tasks),
    "sinusoid mlp": (lambda: MLP(), Regression(), functools.partial(torch.optim.SGD, lr=0.01), 5, "vmap", sinusoid_tasks),
    # learned preconditioners (inner_optim=metacurvature / kronecker): their products run under autocast too
    "omniglot conv4 meta-curvature": (lambda: Conv4(5), Classification(), _transform(MetaCurvatureTransform), 1, "sequential",
                                      bundled_omniglot_tasks),
    "omniglot conv4 vmapped": (lambda: Conv4(5), Classification(), functools.partial(torch.optim.SGD, lr=0.4), 1, "vmap",
                               bundled_omniglot_tasks),
    "omniglot conv4 kronecker": (lambda: Conv4(5), Classification(), _transform(KroneckerTransform(KroneckerLinear)), 1,
                                 "sequential", bundled_omniglot_tasks),
}


def _cosine_and_relative_error(estimate: Tensor, exact: Tensor) -> tuple[float, float]:
    cosine = torch.nn.functional.cosine_similarity(estimate, exact, dim=0).item()
    return cosine, ((estimate - exact).norm() / exact.norm()).item()


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_meta_gradient_matches_float32(case):
    """The meta-gradient under bfloat16 autocast points where float32's does, well within meta-batch sampling noise.

    On the recipes' own tasks (bundled Omniglot, sinusoids) and models at initialisation, we
    require cosine >= 0.97 and relative error <= 0.25, and the bfloat16 error to be below a
    quarter of the float32 difference between this meta-batch's gradient and another
    meta-batch's (of the same size and tasks' distribution). Why these bounds: bfloat16 keeps
    8 significant bits (unit roundoff 2^-8 = 0.4%); every convolution and matrix product of the
    forward, backward and double-backward passes rounds its inputs, and the Omniglot net's
    gradient at initialisation is a sum of many nearly cancelling per-pixel terms, which turns
    0.4% per operand into about 13% of the (small) sum: cosine 0.992 and relative error 0.13
    measured here (first-order MAML is no better, so it is not the second-order terms). The
    sinusoid MLP's five inner steps compound the rounding of each inner gradient: cosine 0.983,
    relative error 0.19. The outer optimizer already steps on a noisy estimate: another meta-batch
    moves the gradient by 120% (Omniglot) to 260% (sinusoid) of its norm, so an error under 25% of that noise changes
    training no more than a slightly smaller meta-batch would. A float16 underflow, optimizer
    state kept in 16 bits or a wrong cast give errors of order 1, which these bounds catch.
    """
    make_model, objective, inner_optim, steps, batch_tasks, tasks = CASES[case]
    torch.manual_seed(0)
    module = MetaLightningModule(make_model(), objective, InnerOptions(steps=steps, batch_tasks=batch_tasks), inner_optim, ADAM)
    batch, other = tasks(seed=0), tasks(seed=1)
    exact, mixed = meta_gradient(module, batch, False), meta_gradient(module, batch, True)
    cosine, relative = _cosine_and_relative_error(mixed, exact)
    _, sampling_noise = _cosine_and_relative_error(meta_gradient(module, other, False), exact)
    print(f"{case}: cosine {cosine:.4f}, relative error {relative:.3f}, another meta-batch {sampling_noise:.2f}")
    assert cosine >= 0.97 and relative <= 0.25, (cosine, relative)
    assert relative < 0.25 * sampling_noise, (relative, sampling_noise)
    assert mixed.dtype == torch.float32


def test_inner_update_state_and_learned_rates_stay_float32_under_bf16_autocast():
    """Fast weights, Adam's moments and a learned per-layer learning rate are float32 after inner steps under autocast."""
    torch.manual_seed(0)
    module = MetaLightningModule(Conv4(5, hidden=8), Classification(), InnerOptions(steps=2, batch_tasks="sequential"), functools.partial(torch.optim.Adam, lr=0.01), ADAM, learnable={"lr": PerLayer()})
    task = omniglot_tasks(1)
    with torch.autocast("cpu", torch.bfloat16):
        fmodel = module.adapt((task.support_x[0], task.support_y[0]), 2, create_graph=True)
        params = [p for _, p in module.model.named_parameters()]
        loss = Classification().loss(module.model(task.support_x[0]), task.support_y[0])
        grads = torch.autograd.grad(loss, params)
        _, states = apply_rule(get_rule(torch.optim.Adam), params, list(grads), [None] * len(params),
                               [{"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
                                 "amsgrad": False, "maximize": False}] * len(params))
    assert all(w.dtype == torch.float32 for w in fmodel.weights.values())
    assert all(g.dtype == torch.float32 for g in grads)
    assert all(v.dtype == torch.float32 for s in states for v in s.values() if isinstance(v, Tensor) and v.is_floating_point())
    assert all(p.dtype == torch.float32 for p in module.learned.values())


def test_float16_autocast_underflows_an_inner_gradient_that_float32_keeps():
    """Why ``16-mixed`` is refused: an unscaled inner gradient of 1e-8 (below float16's 6e-8) becomes exactly zero.

    The gradient scaler of ``16-mixed`` multiplies the outer loss only; the inner loop's
    :func:`torch.autograd.grad` of the support loss sees the raw values.
    """
    w = torch.ones(1, 1, requires_grad=True)
    x = torch.full((1, 1), 1e-4)
    def inner_grad(enabled: bool) -> float:
        with torch.autocast("cpu", torch.float16, enabled=enabled):
            loss = (nn.functional.linear(x, w) * 1e-4).sum()
        return torch.autograd.grad(loss, w)[0].item()
    assert inner_grad(False) == pytest.approx(1e-8, rel=1e-3)
    assert inner_grad(True) == 0.0


@pytest.mark.parametrize("precision", ["16-mixed", "16", "16-true", "bf16-true", "bf16", "8"])
def test_refused_precisions_say_the_value_and_what_is_accepted(precision):
    with pytest.raises(ValueError, match=rf"trainer.precision='{precision}' is refused .*use one of auto, 32-true"):
        check_precision(precision)


@pytest.mark.parametrize("precision", [*ACCEPTED_PRECISIONS, 32, 64])
def test_accepted_precisions_pass(precision):
    check_precision(precision)


@pytest.mark.parametrize("fast_cpu", [True, False], ids=["cpu with bf16 hardware", "cpu without"])
@pytest.mark.parametrize("cuda", [True, False], ids=["cuda", "no cuda"])
def test_auto_precision_is_bf16_mixed_exactly_on_cpus_where_bfloat16_is_fast(fast_cpu, cuda, monkeypatch):
    """Both branches on every host: the CPU's bfloat16 support and CUDA's presence are mocked."""
    monkeypatch.setattr(precision_module, "bf16_fast", lambda device_type: fast_cpu and device_type == "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    cpu = "bf16-mixed" if fast_cpu else "32-true"
    assert auto_precision("cpu") == cpu
    # "gpu"/"auto" mean CUDA when there is one: float32 there (slower on an H200 for these small models, gpu_h200.md)
    assert auto_precision("auto") == ("32-true" if cuda else cpu)
    assert auto_precision("gpu") == "32-true"  # without CUDA, Lightning itself refuses accelerator=gpu
    assert auto_precision("cuda") == "32-true"


def test_bf16_fast_reads_the_cpu_capability_torch_reports(monkeypatch):
    for supported in (True, False):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: supported)
        assert bf16_fast("cpu") is supported
    assert bf16_fast("mps") is False


def test_a_trainer_with_16_bit_weights_is_refused_in_setup(tmp_path):
    torch.manual_seed(0)
    module = MetaLightningModule(MLP(), Regression(), InnerOptions(), functools.partial(torch.optim.SGD, lr=0.01), ADAM)
    data = MetaDataModule(SinusoidTasks(), meta_batch_size=2, num_val_tasks=0, num_test_tasks=0)
    trainer = lightning.Trainer(accelerator="cpu", precision="bf16-true", max_steps=1, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="trainer.precision='bf16-true' is refused"):
        trainer.fit(module, datamodule=data)


def _fit_bf16(module: lightning.LightningModule, data: MetaDataModule, tmp_path) -> lightning.Trainer:
    trainer = lightning.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=2, val_check_interval=2,
                                check_val_every_n_epoch=None, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    trainer.validate(module, datamodule=data, verbose=False)
    return trainer


def _image_tasks(split: str, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    task = omniglot_tasks(1, seed=int(torch.randint(1000, (1,), generator=gen)))
    return tuple(field[0] for field in task)  # type: ignore[return-value]


@pytest.mark.parametrize("kind", ["maml sinusoid", "maml conv4", "prototypical", "metaoptnet"])
def test_every_module_fits_and_validates_under_bf16_mixed_with_float32_weights(kind, tmp_path):
    torch.manual_seed(0)
    if kind == "maml sinusoid":
        module: lightning.LightningModule = MetaLightningModule(MLP(), Regression(), InnerOptions(steps=2), functools.partial(torch.optim.SGD, lr=0.01), ADAM)
        source = SinusoidTasks()
    elif kind == "maml conv4":
        module = MetaLightningModule(Conv4(5, hidden=8), Classification(), InnerOptions(), functools.partial(torch.optim.SGD, lr=0.4), ADAM)
        source = _image_tasks
    else:
        head = PrototypicalClassifier() if kind == "prototypical" else SVClassifier(C_reg=0.1, max_iters=5)
        module = PrototypicalModule(conv4_backbone(hidden=8), head, ADAM)
        source = _image_tasks
    data = MetaDataModule(source, meta_batch_size=2, eval_meta_batch_size=2, num_val_tasks=2, num_test_tasks=0)
    trainer = _fit_bf16(module, data, tmp_path)
    assert trainer.global_step == 2 and trainer.precision == "bf16-mixed"
    metrics = trainer.callback_metrics
    assert all(torch.isfinite(v).all() for k, v in metrics.items() if k.startswith(("train/", "val/"))), metrics
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in module.parameters())


# -- memory format ----------------------------------------------------------------------------------
def test_to_memory_format_gives_each_task_channels_last_strides():
    x = torch.rand(3, 5, 4, 6, 7)
    y = to_memory_format(x, torch.channels_last)
    assert torch.equal(x, y)
    assert all(y[i].is_contiguous(memory_format=torch.channels_last) for i in range(3))
    assert to_memory_format(x[0], torch.channels_last).is_contiguous(memory_format=torch.channels_last)
    labels = torch.arange(5)
    assert to_memory_format(labels, torch.channels_last) is labels


@pytest.mark.parametrize("fast_cpu", [True, False], ids=["cpu with bf16 hardware", "cpu without"])
def test_auto_memory_format_by_device_model_and_precision(fast_cpu, monkeypatch):
    monkeypatch.setattr(precision_module, "bf16_fast", lambda device_type: fast_cpu and device_type == "cpu")
    conv, mlp = Conv4(5, hidden=8), MLP()
    # H200 (benchmarks/results/gpu_h200.md): channels-last 1.24x under bf16-mixed, 0.82x in float32
    assert auto_memory_format(conv, "cuda", "bf16-mixed") is torch.channels_last
    assert auto_memory_format(conv, "cuda", "32-true") is torch.contiguous_format
    assert auto_memory_format(conv, "cuda", "bf16-mixed", batched=True) is torch.contiguous_format
    assert auto_memory_format(mlp, "cuda", "bf16-mixed") is torch.contiguous_format
    assert auto_memory_format(conv, "cpu", "32-true") is torch.contiguous_format  # slower on CPUs (benchmarks)
    expected = torch.channels_last if fast_cpu else torch.contiguous_format
    assert auto_memory_format(conv, "cpu", "bf16-mixed") is expected
    assert auto_memory_format(conv, "cpu", "bf16-mixed", batched=True) is torch.contiguous_format
    with pytest.raises(ValueError, match="memory_format='nhwc' is not one of auto, channels_last, contiguous"):
        resolve_memory_format("nhwc", conv, "cpu", "32-true")
    with pytest.raises(ValueError, match="memory_format='nhwc' is not one of"):
        MetaLightningModule(conv, Classification(), InnerOptions(), functools.partial(torch.optim.SGD, lr=0.4), ADAM, memory_format="nhwc")


@pytest.mark.parametrize("inner", [torch.optim.SGD, torch.optim.Adam])
@pytest.mark.parametrize("batch_tasks", ["sequential", "vmap"])
def test_channels_last_is_kept_through_inner_steps_and_gives_the_same_meta_gradient(inner, batch_tasks):
    """In float64 (exact up to summation order), channels-last and contiguous runs agree to 1e-9; fast weights stay channels-last."""
    torch.manual_seed(0)
    first_order = batch_tasks == "vmap"  # second order through BatchNorm under vmap is refused (torch 2.13)
    grads, modules = {}, {}
    for fmt in ("contiguous", "channels_last"):
        torch.manual_seed(0)
        module = MetaLightningModule(Conv4(5, hidden=8), Classification(), InnerOptions(steps=3, first_order=first_order, batch_tasks=batch_tasks), functools.partial(inner, lr=0.1), ADAM, memory_format=fmt).double()
        batch = Task(*(f.double() if f.is_floating_point() else f for f in omniglot_tasks(2)))
        module.meta_gradient(batch)
        grads[fmt] = torch.cat([p.grad.flatten() for p in module.parameters()])
        modules[fmt] = module
    torch.testing.assert_close(grads["channels_last"], grads["contiguous"], rtol=1e-9, atol=1e-11)
    module = modules["channels_last"]
    assert module.model.features[4].weight.is_contiguous(memory_format=torch.channels_last)
    x = to_memory_format(omniglot_tasks(1).support_x[0].double(), torch.channels_last)
    fmodel = module.adapt((x, torch.arange(5)), 3)
    conv_weights = [w for w in fmodel.weights.values() if w.ndim == 4 and w.shape[1] > 1]
    assert conv_weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights)


def test_vmap_over_batchnorm_under_bf16_mixed_fits_and_auto_follows_the_table(tmp_path):
    """BatchNorm under bf16-mixed and vmap (PyTorch's own backward fails there): plain-operation BatchNorm fits it."""
    data = MetaDataModule(_image_tasks, meta_batch_size=2, num_val_tasks=0, num_test_tasks=0)
    for batch_tasks in ("vmap", "auto"):
        torch.manual_seed(0)
        module = MetaLightningModule(Conv4(5, hidden=8), Classification(), InnerOptions(batch_tasks=batch_tasks), functools.partial(torch.optim.SGD, lr=0.4), ADAM)
        trainer = lightning.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=1, logger=False,
                                    enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
        trainer.fit(module, datamodule=data)
        assert trainer.global_step == 1 and module.batching == ("vmap" if batch_tasks == "vmap" else "sequential")  # auto: conv nets one by one on CPUs
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in module.parameters())


# -- batch_tasks=auto, on every device type whatever the host ------------------------------------------
@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("model,first_order", [("conv4", True), ("conv4", False), ("mlp", False)])
def test_auto_batching_follows_the_table_for_each_device_and_stays_exact(device_type, precision, model, first_order):
    """``batch_tasks=auto`` for CPU and CUDA alike (the device type is an argument: no GPU needed to test CUDA's branch).

    Conv nets go task by task on CPUs and are folded on CUDA (``AUTO_BATCHING``), second order and bf16-mixed included.
    """
    from metaloop.algorithms.inner import AUTO_BATCHING

    net = Conv4(5, hidden=8) if model == "conv4" else MLP()
    module = MetaLightningModule(net, Classification() if model == "conv4" else Regression(), InnerOptions(first_order=first_order), functools.partial(torch.optim.SGD, lr=0.1), ADAM)
    kind = "conv" if model == "conv4" else "other"
    # every path is exact for all of them (folding; plain-operation BatchNorm under vmap): the table's first entry
    assert module.choose_batching(device_type, precision) == AUTO_BATCHING[(device_type, kind)][0]


# -- learned transforms under bfloat16 autocast: float32 in, float32 out -------------------------------
def test_learned_transforms_keep_float32_updates_and_parameters_under_bf16_autocast():
    """learn2learn's LearnableOptimizer and ParameterUpdate, and TransformOptimizer steps, under autocast.

    The transforms' products run in bfloat16 (autocast's choice for matmuls); the update handed to the rule and
    the stepped weights stay float32, and the transforms' parameters get float32 gradients.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    x, y = torch.randn(8, 6), torch.randint(3, (8,))
    for factory in (KroneckerTransform(KroneckerLinear), MetaCurvatureTransform, ModuleTransform(nn.Linear)):
        update = ParameterUpdate(list(model.parameters()), factory)
        with torch.autocast("cpu", torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
            updates = update(loss, list(model.parameters()), create_graph=True)
        assert all(u.dtype == torch.float32 for u in updates), [u.dtype for u in updates]
        sum(u.square().sum() for u in updates).backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in update.parameters())

        learner = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
        optimizer = LearnableOptimizer(learner, factory, lr=0.1)
        with torch.autocast("cpu", torch.bfloat16):
            nn.functional.cross_entropy(learner(x), y).backward()
            optimizer.step()
            after = nn.functional.cross_entropy(learner(x), y)
        assert all(p.dtype == torch.float32 for p in learner.parameters())
        after.backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in optimizer.parameters())
