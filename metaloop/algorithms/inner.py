"""The parts of a gradient-based learner's inner loop, read once at construction: pure functions of the model and options.

Which parameters adapt (:func:`select_adapted`), which layer is the classifier head (:func:`find_head`),
the inner optimizer's rule and per-parameter hyperparameters (:func:`read_inner_optimizer`), learned
hyperparameters (:func:`learned_values`), how a meta-batch is batched (:func:`choose_batching`)
and the head resized for another number of classes (:func:`resize_head`). They are functions, not
methods, so that a learner's constructor calls nothing a subclass overrides.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from metaloop.algorithms.learned import Learned, is_number_or_tuple
from metaloop.algorithms.options import InnerOptions
from metaloop.optim import Rule, get_rule
from metaloop.optim.hyperparams import per_parameter
from metaloop.optim.loop import vmap_problems

__all__ = [
    "AUTO_BATCHING",
    "MEASURE_BATCHING_STEPS",
    "exact_batchings",
    "fastest",
    "Batching",
    "choose_batching",
    "find_head",
    "learned_values",
    "model_kind",
    "refuse_for_implicit",
    "read_inner_optimizer",
    "resize_head",
    "select_adapted",
]

OptimizerFactory = Callable[[Iterable[Tensor]], torch.optim.Optimizer]

Batching = Literal["sequential", "vmap", "fold"]

# What batch_tasks="auto" tries, by device type and model kind ("conv": it has a 2-D convolution): the paths of the
# list that are exact for the learner and model (see exact_batchings). A short run takes the first; a run of at least
# MEASURE_BATCHING_STEPS meta-steps (or bounded by time) times each on its first meta-batch and keeps the fastest
# (MetaLearner.measure_batching), since which one wins depends on the CPU and the task's size. Measured with
# benchmarks/fit.py and benchmarks/batched_second_order.py (CPU), benchmarks/gpu.py (CUDA); devices not listed: "cpu".
AUTO_BATCHING: dict[tuple[str, str], tuple[Batching, ...]] = {
    # second-order conv-4, meta-batch 16, 2 inner steps, 2 threads (benchmarks/batched_second_order.py): with 15
    # queries per class, task by task 1828 ms, folded 2339 ms, vmapped 4189 ms on an Intel Xeon (AMX) and 1541, 2375,
    # 4597 ms on an AMD EPYC (AVX-512 BF16); with 1 query per class (Finn et al.'s setting) on the AMD EPYC, 690, 976
    # and 486 ms: on CPUs a conv-4's step is bound by arithmetic and memory traffic, and the fastest path depends on
    # the task's size, so long runs measure
    ("cpu", "conv"): ("sequential", "vmap", "fold"),
    # sinusoid MLP, 25 tasks, 5 inner steps, 1 thread: folded 9.0 ms, vmapped 13.3 ms, task by task 88 ms
    ("cpu", "other"): ("fold", "vmap", "sequential"),
    # a conv-4 on a GPU is launch-bound: first-order MAML on an H200 ran 41.8 meta-steps/s vmapped, 2.5 task by task
    # (gpu_h200.md); folding launches 22x fewer kernels than vmap (not yet measured on a GPU: none was lent when it
    # landed; benchmarks/gpu.py measures every path)
    ("cuda", "conv"): ("fold", "vmap", "sequential"),
    ("cuda", "other"): ("vmap", "fold", "sequential"),
}

#: runs of at least this many meta-steps (or bounded by time) with batch_tasks="auto" time each exact path on their
#: first meta-batch (two meta-gradients each, about 1% of such a run) and keep the fastest
MEASURE_BATCHING_STEPS = 200


def fastest(seconds: dict[Batching, float]) -> Batching:
    """Returns the path of ``seconds`` (its measured time per meta-step) that took least; the first listed on a tie."""
    return min(seconds, key=lambda path: (seconds[path], list(seconds).index(path)))


def model_kind(model: nn.Module) -> str:
    """Returns the kind of model the tables of ``auto`` choices are written for: ``"conv"`` (it has a convolution) or ``"other"``."""
    return "conv" if any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()) else "other"


def choose_batching(
    model: nn.Module, batch_tasks: str, first_order: bool, device_type: str, fold_problems: list[str]
) -> Batching:
    """Returns how a meta-batch is adapted: the first of :func:`exact_batchings`."""
    return exact_batchings(model, batch_tasks, first_order, device_type, fold_problems)[0]


def exact_batchings(
    model: nn.Module, batch_tasks: str, first_order: bool, device_type: str, fold_problems: list[str]
) -> tuple[Batching, ...]:
    """Returns the ways a meta-batch may be adapted: ``(batch_tasks,)``, or for ``"auto"`` the exact paths of :data:`AUTO_BATCHING`, in its order.

    ``"vmap"``: under :func:`torch.func.vmap` with exact normalization layers; ``"fold"``: tasks folded into
    channels (:mod:`metaloop.algorithms.folding`; ``fold_problems`` says why the learner cannot);
    ``"sequential"``: task by task, always possible.

    Raises:
        ValueError: for ``batch_tasks="vmap"`` or ``"fold"`` and a learner or model that path cannot adapt
            exactly (naming why, and what to use).
    """
    problems = {
        "vmap": vmap_problems(model, second_order=not first_order, exact_norms=True),
        "fold": fold_problems,
        "sequential": [],
    }
    if batch_tasks in ("vmap", "fold") and problems[batch_tasks]:
        why = problems[batch_tasks]
        others = [b for b in ("fold", "vmap") if b != batch_tasks and not problems[b]]
        raise ValueError(
            f"batch_tasks={batch_tasks!r} cannot adapt this model: {'; '.join(why)}; use batch_tasks="
            + " or ".join(repr(b) for b in ["auto", *others, "sequential"])
            + (", or BatchNorm without running statistics (track_running_stats=False)" if "buffers" in why[0] else "")
        )
    if batch_tasks == "auto":
        kind = model_kind(model)
        order = AUTO_BATCHING.get((device_type, kind), AUTO_BATCHING[("cpu", kind)])
        return tuple(b for b in dict.fromkeys((*order, "sequential")) if not problems[b])
    return (batch_tasks,)  # type: ignore[return-value]


def find_head(model: nn.Module, head: str | None) -> str | None:
    """Returns the name of the classifier head: ``head``, else a linear layer named ``head``, else the last linear layer.

    Raises:
        ValueError: if ``head`` names no ``nn.Linear`` of the model.
    """
    modules = dict(model.named_modules())
    linear = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    if head is not None:
        if not isinstance(modules.get(head), nn.Linear):
            raise ValueError(f"head={head!r} is not an nn.Linear of the model; its linear layers are {linear}")
        return head
    if isinstance(modules.get("head"), nn.Linear):
        return "head"  # not the last linear layer where one follows it (FiLM's)
    return linear[-1] if linear else None


def select_adapted(model: nn.Module, pattern: str | None, fix: str = "fix the pattern") -> list[str]:
    """Returns the names of the parameters the inner loop adapts: those ``pattern`` matches (None: all).

    Parameters of modules marked ``inner_frozen = True`` (per-step BatchNorm: meta-learned per inner step,
    never adapted) are left out.

    Raises:
        ValueError: if nothing is left (the message ends with ``fix``).
    """
    frozen = {
        f"{name}.{p}" if name else p
        for name, module in model.named_modules() if getattr(module, "inner_frozen", False)
        for p, _ in module.named_parameters()
    }
    names = [n for n, _ in model.named_parameters()]
    chosen = [n for n in names if (pattern is None or re.search(pattern, n)) and n not in frozen]
    if not chosen:
        why = f" (parameters of layers that never adapt: {sorted(frozen)})" if frozen else ""
        raise ValueError(f"params={pattern!r} matches none of the model's adaptable parameters {names}{why}; {fix}")
    return chosen


def read_inner_optimizer(
    model: nn.Module, adapted: list[str], inner_optim: OptimizerFactory, lr: float | None
) -> tuple[Rule, dict[str, dict[str, Any]]]:
    """Returns the inner rule (from the optimizer table) and each adapted parameter's hyperparameters (``lr`` set if given).

    Raises:
        TypeError: if ``inner_optim`` does not build a ``torch.optim.Optimizer``.
        ValueError: for several param groups, an optimizer without a pure rule, or hyperparameters the rule refuses.
    """
    params = dict(model.named_parameters())
    optimizer = inner_optim([params[n] for n in adapted])
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"inner_optim must build a torch.optim.Optimizer (e.g. functools.partial(torch.optim.SGD, lr=0.4)), "
            f"got {type(optimizer).__name__}"
        )
    if len(optimizer.param_groups) != 1:
        raise ValueError(
            f"inner_optim built {len(optimizer.param_groups)} param groups; give it one (per-parameter values "
            "are learned hyperparameters: learnable={'lr': PerTensor()})"
        )
    rule = get_rule(type(optimizer))
    if rule is None:
        raise ValueError(
            f"{type(optimizer).__name__}'s differentiable version has no pure update rule, which the fast inner "
            "loop needs; register one with metaloop.optim.register_optim(optimizer_type, Rule(init=..., update=...))"
        )
    group = dict(optimizer.param_groups[0])
    if lr is not None:
        group["lr"] = lr
    hparams = per_parameter(group)
    if rule.check is not None:
        for hp in hparams:
            rule.check(hp)
    return rule, dict(zip(adapted, hparams))


def learned_values(
    model: nn.Module, adapted: list[str], defaults: Mapping[str, Any], hp_name: str, spec: Learned
) -> tuple[dict[str, nn.Parameter], dict[str, str]]:
    """Returns the learned values of hyperparameter ``hp_name`` by key, and each adapted parameter's key.

    ``defaults`` are the inner optimizer's hyperparameters (the start, unless ``spec.init`` says otherwise).

    Raises:
        ValueError: if ``hp_name`` is not a hyperparameter of the inner optimizer, or starts at a value
            that is not a number or tuple of numbers.
    """
    if hp_name not in defaults:
        known = sorted(k for k, v in defaults.items() if is_number_or_tuple(v))
        raise ValueError(
            f"learnable names {hp_name!r}, which is not a hyperparameter of the inner optimizer (it has {known}); "
            "learn one of those, or pick an inner optimizer that has it (betas: adam, adamax, nadam, radam)"
        )
    init = defaults[hp_name] if spec.init is None else spec.init
    if not is_number_or_tuple(init):
        raise ValueError(f"learnable {hp_name!r} starts at {init!r}; a learned hyperparameter must be a number or tuple of numbers")
    params = dict(model.named_parameters())
    values: dict[str, nn.Parameter] = {}
    keys: dict[str, str] = {}
    for name in adapted:
        group = spec.key(name)
        key = hp_name if not group else f"{hp_name}/{group.replace('.', '/')}"
        if key not in values:
            param = params[name]
            start = torch.as_tensor(init, dtype=param.dtype, device=param.device)
            shape = tuple(start.shape) + spec.shape(param)
            value = start.reshape(tuple(start.shape) + (1,) * len(spec.shape(param))).expand(shape)
            values[key] = nn.Parameter(value.clone())
        keys[name] = key
    return values, keys


def resize_head(
    params: dict[str, Tensor], hparams: dict[str, dict[str, Any]], head: nn.Linear, head_name: str, n_ways: int,
    keep: Callable[[str], bool] = lambda hp: False,
) -> None:
    """Replaces the head's weights in ``params`` by zeros with ``n_ways`` outputs, and its per-element hyperparameters in
    ``hparams`` by their mean over the trained outputs (hyperparameters ``keep`` names stay as they are).

    Raises:
        ValueError: if the head does not adapt (a new head would stay at zero) or has learned transforms sized for it.
    """
    head_names = [f"{head_name}.{n}" for n, _ in head.named_parameters()]
    if not all(n in hparams for n in head_names):
        raise ValueError(
            f"n_ways={n_ways} differs from the head's {head.out_features} outputs, but the head {head_name!r} does "
            "not adapt (inner.params excludes it), so a new head would stay at zero; adapt the head or use "
            f"n_ways={head.out_features}"
        )
    if any(isinstance(v, nn.Module) for n in head_names for v in hparams[n].values()):
        raise ValueError(
            f"n_ways={n_ways} differs from the head's {head.out_features} outputs, and the learned transforms of "
            f"the head are sized for {head.out_features}; evaluate {head.out_features}-way tasks or train with "
            f"n_ways={n_ways}"
        )
    for name in head_names:
        old = params[name]
        # a leaf that takes gradients, as the trained head did: the inner loop skips weights without them
        params[name] = old.new_zeros((n_ways, *old.shape[1:])).requires_grad_(old.requires_grad)
        hparams[name] = {
            k: v if keep(k) or not isinstance(v, Tensor) else _resize_rows(v, old.shape, n_ways)
            for k, v in hparams[name].items()
        }


def _resize_rows(value: Tensor, shape: torch.Size, rows: int) -> Tensor:
    """Returns a per-element value of a head parameter of ``shape`` for ``rows`` outputs: the mean over trained rows."""
    if tuple(value.shape[-len(shape):]) != tuple(shape) or len(shape) == 0:
        return value
    lead = value.ndim - len(shape)
    mean = value.mean(dim=lead, keepdim=True)
    return mean.expand(*value.shape[:lead], rows, *shape[1:])


def refuse_for_implicit(inner: InnerOptions, inner_modules: nn.ModuleDict) -> None:
    """Raises ``ValueError`` for what ``meta_grad="implicit"`` cannot give a gradient: learned transforms, a subset of parameters."""
    if inner.meta_grad != "implicit":
        return
    # iMAML differentiates the initial adapted weights only: anything else the support loss reads would miss
    # its path through the inner solution
    if len(inner_modules):
        raise ValueError(
            "meta_grad='implicit' gives learned inner hyperparameters or transforms no gradient (the inner "
            "solution does not depend on them); use learnable=None and a torch.optim inner optimizer, or "
            "meta_grad='unrolled'"
        )
    if inner.params is not None:
        raise ValueError(
            f"meta_grad='implicit' adapts all parameters (params={inner.params!r} would leave the "
            "non-adapted ones without their gradient through the inner solution); use params=None"
        )
