"""The LightningModule of meta-learning: an inner loop per task inside Lightning's outer loop.

:class:`MetaLightningModule` adapts the model to each task of a meta-batch with a differentiable
inner optimizer (:func:`metaloop.optim.loop.inner_loop` with the rule the optimizer table gives
its inner optimizer: any ``torch.optim`` algorithm, or a learned gradient transform), scores the adapted model on the task's query set, and steps an
outer optimizer on the mean query loss. MAML, first-order MAML, ANIL, Meta-SGD, per-layer or
Adam-hyperparameter learning, Meta-Curvature and Kronecker-factored MAML are choices of its
arguments, not subclasses. What a task's loss is comes from an :class:`Objective`
(:class:`Classification`, :class:`Regression`) or from the hooks :meth:`~MetaLightningModule.inner_loss`,
:meth:`~MetaLightningModule.outer_loss` and :meth:`~MetaLightningModule.task_metrics`.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal

import lightning
import torch
from lightning.pytorch.strategies import ParallelStrategy
from torch import Tensor, nn

from metaloop.lightning.adapted_model import AdaptedModel
from metaloop.lightning.datamodule import MetaDataModule
from metaloop.lightning.learned import Learned, is_number_or_tuple
from metaloop.lightning.metrics import MeanWithConfidence
from metaloop.lightning.objectives import Objective
from metaloop.lightning.precision import MEMORY_FORMATS, MemoryFormat, check_precision, resolve_memory_format, to_memory_format
from metaloop.optim import Rule, get_rule
from metaloop.optim.hyperparams import per_parameter
from metaloop.optim.implicit import ImplicitOptions, implicit_inner_loop
from metaloop.nn.plain_norms import exact_norms
from metaloop.optim.loop import inner_loop, truncation_start, vmap_problems
from metaloop.tasks import Task, sample_task
from metaloop.utils import _recursive_map

__all__ = ["MetaLightningModule"]

Batch = tuple[Tensor, Tensor]
OptimizerFactory = Callable[[Iterable[Tensor]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
BatchTasks = Literal["auto", "vmap", "sequential"]
MetaGrad = Literal["unrolled", "truncated", "implicit"]

_STAGE_SPLITS = {"fit": "train", "validate": "val", "test": "test"}

# What batch_tasks="auto" picks for a model that vmap can adapt, by device type and model kind ("conv": it has a
# 2-D convolution). Measured with benchmarks/run.py (CPU) and benchmarks/gpu.py (CUDA); devices not listed: "cpu".
AUTO_BATCHING: dict[tuple[str, str], Literal["vmap", "sequential"]] = {
    ("cpu", "conv"): "sequential",  # vmapped conv nets are slower on CPU (benchmarks/results/results.md)
    ("cpu", "other"): "vmap",
    ("cuda", "conv"): "vmap",  # first-order MAML on an H200: 41.8 meta-steps/s vmapped, 2.5 sequential (gpu_h200.md)
    ("cuda", "other"): "vmap",
}


@contextlib.contextmanager
def inner_grad_mode(create_graph: bool) -> Iterator[None]:
    """Enables the gradients an inner loop takes: evaluation hooks run under inference mode or ``no_grad``.

    With ``create_graph`` (training) the caller's mode already records the graph and is kept.
    """
    if create_graph:
        yield
        return
    with torch.inference_mode(False), torch.enable_grad():
        yield


class _LastCall:
    """Wraps an adapted model, remembering its last call; :meth:`replay` answers that same call again from memory."""

    def __init__(self, fmodel: AdaptedModel) -> None:
        self.fmodel = fmodel
        self.key: tuple[Any, ...] | None = None
        self.output: Any = None

    @staticmethod
    def _key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        # The arguments are alive across both calls, so their ids identify them.
        return tuple(map(id, args)) + tuple((k, id(v)) for k, v in sorted(kwargs.items()))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        output = self.fmodel(*args, **kwargs)
        self.key, self.output = self._key(args, kwargs), output
        return output

    def replay(self, *args: Any, **kwargs: Any) -> Any:
        """Returns the remembered output, detached, for the same arguments; else runs the model."""
        if self.key is not None and self._key(args, kwargs) == self.key:
            return _recursive_map(self.output, lambda t: t.detach() if isinstance(t, Tensor) else t)
        return self.fmodel(*args, **kwargs)


def _detached(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, tuple):
        return tuple(_detached(v) for v in value)
    return value


# -- The module ---------------------------------------------------------------------------
class MetaLightningModule(lightning.LightningModule):
    """A LightningModule that meta-learns ``model``'s initial weights, learned inner hyperparameters and transforms.

    Each training step takes a meta-batch (:class:`~metaloop.tasks.Task` with a leading task
    dimension), adapts the model to each task's support set with ``inner_steps`` steps of the
    inner optimizer, scores the query set with :meth:`outer_loss`, and steps the outer optimizer
    on the mean query loss. Validation and test adapt the same way for ``eval_inner_steps`` steps
    without a higher-order graph and log pre- and post-adaptation metrics (mean and 95%
    confidence half-width over the evaluation tasks, e.g. ``test/acc_post``, ``test/acc_post_ci95``).

    Args:
        model: the network; its last ``nn.Linear`` (or the module named ``head``) is the head.
        objective: the task's loss and metrics (:class:`Classification`, :class:`Regression`).
        inner_optim: a ``torch.optim`` optimizer class or partial (``functools.partial(torch.optim.SGD,
            lr=0.4)``); it is called on the adapted parameters once, to read its hyperparameters. Values
            that are modules (a :class:`~metaloop.transforms.TransformOptimizer`'s one learned transform
            per adapted parameter) become submodules in :attr:`inner_modules`, trained by the outer
            optimizer and saved in checkpoints. Any optimizer in the optimizer table
            (:data:`metaloop.optim.OPTIMIZERS`, extended by :func:`metaloop.optim.register_optim`) works.
        outer_optim: an optimizer partial, called on all trainable parameters of this module.
        scheduler: an LR scheduler partial called on the outer optimizer, stepped every meta-step.
        inner_steps: inner steps per task in training.
        eval_inner_steps: inner steps in validation, test and :meth:`adapt` (default ``inner_steps``).
        first_order: drop second-order terms (first-order MAML).
        adapt_params: a regular expression searched in each parameter name; only matching parameters
            adapt (ANIL: ``"^head\\."``). None adapts all.
        learnable: which inner hyperparameters are learned, e.g. ``{"lr": PerElement()}`` (Meta-SGD),
            ``{"lr": PerLayer()}``, ``{"betas": Shared()}``. Learned values are ``nn.Parameter``s in
            :attr:`learned`; :meth:`learned_hyperparameters` exports them.
        batch_tasks: ``"vmap"`` adapts a meta-batch at once under :func:`torch.func.vmap` (one
            backward), ``"sequential"`` task by task with one backward each (memory of one task;
            under DDP only the last task's backward synchronises). ``"auto"``: sequential for models
            with buffers (running statistics), otherwise :data:`AUTO_BATCHING`'s choice for the
            device type the module runs on and whether the model has convolutions (CPU: conv nets
            sequential, vmap otherwise). Under vmap, BatchNorm, InstanceNorm and LayerNorm are computed
            with plain operations (:func:`metaloop.nn.exact_norms`), exact at second order where
            PyTorch's batching rules are not. Re-chosen in :meth:`setup` for the Trainer's device.
        head: name of the classifier module, re-created for :meth:`adapt` with another ``n_ways``.
        meta_grad: how the meta-gradient goes through the inner loop. ``"unrolled"``: through every
            inner step. ``"truncated"``: through the last ``truncate`` steps only (the earlier ones
            count as first-order; memory grows with ``truncate``, not ``inner_steps``; see
            :func:`metaloop.optim.loop.truncation_start`). ``"implicit"``: iMAML (Rajeswaran et al.
            2019): the inner loop descends the support loss plus ``lam/2 ||phi - theta||^2``, in
            training and evaluation, and the meta-gradient comes from the implicit function
            theorem (memory flat in ``inner_steps``; see :func:`metaloop.optim.implicit.implicit_inner_loop`).
        truncate: the number of last inner steps backpropagated with ``meta_grad="truncated"``
            (``1..inner_steps``).
        implicit: ``lam``, ``solver`` (``"cg"`` or ``"neumann"``), ``maxiter`` and ``tol`` of
            ``meta_grad="implicit"`` (:class:`~metaloop.optim.implicit.ImplicitOptions` or a mapping
            of its fields; defaults when None); unused by the other modes.
        memory_format: ``"channels_last"`` keeps a conv net's weights and its input images in
            channels-last (NHWC) memory, ``"contiguous"`` in NCHW; ``"auto"`` picks channels-last
            where it is faster (see :func:`metaloop.lightning.precision.auto_memory_format`: under bf16-mixed
            on CUDA and on CPUs with fast bfloat16, tasks adapted one by one), resolved in :meth:`setup` for the
            Trainer's device and precision (contiguous outside a Trainer). Inner steps keep the format.

    Precision: under Lightning's ``trainer.precision="bf16-mixed"`` the inner loop's forward and
    backward passes run under bfloat16 autocast while weights, fast weights, inner optimizer state
    and learned hyperparameters stay float32; ``"16-mixed"`` and 16-bit weights are refused in
    :meth:`setup` (see :func:`metaloop.lightning.precision.check_precision`).

    Raises:
        ValueError: at construction, for a pattern that matches no parameter, a learned name that
            is not a hyperparameter of the inner optimizer, negative steps, an unknown ``batch_tasks``
            or ``meta_grad``, a ``truncate`` outside ``1..inner_steps`` or without ``meta_grad="truncated"``,
            bad implicit options, or options that ``meta_grad`` cannot honour (see :meth:`_check_meta_grad`).
    """

    #: when evaluation scores the query sets: before and after adaptation (``val/acc_pre``, ``val/acc_post``)
    evaluation_phases: tuple[str, ...] = ("pre", "post")

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        inner_optim: OptimizerFactory,
        outer_optim: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        inner_steps: int = 1,
        eval_inner_steps: int | None = None,
        first_order: bool = False,
        adapt_params: str | None = None,
        learnable: Mapping[str, Learned] | None = None,
        batch_tasks: BatchTasks = "auto",
        head: str | None = None,
        meta_grad: MetaGrad = "unrolled",
        truncate: int | None = None,
        implicit: ImplicitOptions | Mapping[str, Any] | None = None,
        memory_format: MemoryFormat = "auto",
    ) -> None:
        super().__init__()
        eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        for name, value in (("inner_steps", inner_steps), ("eval_inner_steps", eval_inner_steps)):
            if value < 0:
                raise ValueError(f"{name}={value} must be >= 0; pass the number of inner-loop steps")
        if batch_tasks not in ("auto", "vmap", "sequential"):
            raise ValueError(f"batch_tasks={batch_tasks!r} is not one of 'auto', 'vmap', 'sequential'")
        if memory_format not in MEMORY_FORMATS:
            raise ValueError(f"memory_format={memory_format!r} is not one of {', '.join(repr(m) for m in MEMORY_FORMATS)}")
        self.save_hyperparameters(
            "inner_steps", "eval_inner_steps", "first_order", "adapt_params", "batch_tasks", "head", "meta_grad", "truncate"
        )
        self.automatic_optimization = False
        self.model = model
        self.objective = objective
        self.outer_optim = outer_optim
        self.scheduler = scheduler
        self.inner_steps = inner_steps
        self.eval_inner_steps = eval_inner_steps
        self.first_order = first_order
        self.batch_tasks = batch_tasks
        self.batched = self._choose_batching(batch_tasks, "cpu", "32-true")
        self.memory_format = memory_format
        self._input_format = resolve_memory_format(memory_format, model, "cpu", "32-true", self.batched)
        model.to(memory_format=self._input_format)
        self.head = self._find_head(head)
        self.adapted_names = self._select_adapted(adapt_params)
        self.rule, self._inner_hparams = self._read_inner_optimizer(inner_optim)
        # Module-valued hyperparameters (a TransformOptimizer's learned transforms) are trained by the
        # outer optimizer and saved in checkpoints: register them as submodules.
        self.inner_modules = nn.ModuleDict()
        for name, hparams in self._inner_hparams.items():
            for hp_name, value in hparams.items():
                if isinstance(value, nn.Module):
                    if hp_name not in self.inner_modules:
                        self.inner_modules[hp_name] = nn.ModuleDict()
                    self.inner_modules[hp_name][name.replace(".", "/")] = value
        self.learned = nn.ParameterDict()
        self._learned_keys: dict[str, dict[str, str]] = {}
        for hp_name, spec in (learnable or {}).items():
            self._add_learned(hp_name, spec)
        self.meta_grad, self.truncate = meta_grad, truncate
        self.implicit = implicit if isinstance(implicit, ImplicitOptions) else ImplicitOptions(**(implicit or {}))
        self._check_meta_grad(adapt_params)
        self.eval_metrics = nn.ModuleDict({
            f"{stage}_{name}_{when}": MeanWithConfidence()
            for stage in ("val", "test")
            for name in objective.metric_names
            for when in self.evaluation_phases
        })

    # -- construction helpers -------------------------------------------------------------
    def _choose_batching(self, batch_tasks: BatchTasks, device_type: str, precision: str) -> bool:
        problems = vmap_problems(self.model, second_order=not self.first_order, exact_norms=True)
        if batch_tasks == "vmap" and problems:
            raise ValueError(
                f"batch_tasks='vmap' cannot adapt this model: {'; '.join(problems)}; use batch_tasks='sequential'"
                + (", or BatchNorm without running statistics (track_running_stats=False)" if "buffers" in problems[0] else "")
            )
        if batch_tasks == "auto":
            kind = "conv" if any(isinstance(m, nn.modules.conv._ConvNd) for m in self.model.modules()) else "other"
            choice = AUTO_BATCHING.get((device_type, kind), AUTO_BATCHING[("cpu", kind)])
            return not problems and choice == "vmap"
        return batch_tasks == "vmap"

    def _find_head(self, head: str | None) -> str | None:
        modules = dict(self.model.named_modules())
        if head is not None:
            if not isinstance(modules.get(head), nn.Linear):
                linear = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
                raise ValueError(f"head={head!r} is not an nn.Linear of the model; its linear layers are {linear}")
            return head
        linear = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
        return linear[-1] if linear else None

    def _select_adapted(self, pattern: str | None) -> list[str]:
        names = [n for n, _ in self.model.named_parameters()]
        if pattern is None:
            return names
        chosen = [n for n in names if re.search(pattern, n)]
        if not chosen:
            raise ValueError(f"adapt_params={pattern!r} matches none of the model's parameters {names}; fix the pattern")
        return chosen

    def _read_inner_optimizer(self, inner_optim: OptimizerFactory) -> tuple[Rule, dict[str, dict[str, Any]]]:
        """Returns the inner rule (from the optimizer table) and each adapted parameter's hyperparameters."""
        params = dict(self.model.named_parameters())
        adapted = [params[n] for n in self.adapted_names]
        optimizer = inner_optim(adapted)
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
        hparams = per_parameter(optimizer.param_groups[0])
        if rule.check is not None:
            for hp in hparams:
                rule.check(hp)
        return rule, dict(zip(self.adapted_names, hparams))

    def _check_meta_grad(self, adapt_params: str | None) -> None:
        """Raises ``ValueError`` for a ``meta_grad`` mode that is unknown or cannot honour the other options."""
        modes = ("unrolled", "truncated", "implicit")
        if self.meta_grad not in modes:
            raise ValueError(f"meta_grad={self.meta_grad!r} is not one of {modes}")
        if self.meta_grad == "truncated":
            if self.truncate is None:
                raise ValueError("meta_grad='truncated' needs truncate=k, the number of last inner steps to backpropagate through")
            truncation_start(self.inner_steps, self.truncate)  # raises for a value outside 0..inner_steps
            if self.truncate == 0:
                raise ValueError(
                    "truncate=0 backpropagates through no inner step (first-order MAML); use truncate >= 1, or "
                    "meta_grad='unrolled' with first_order=True"
                )
        elif self.truncate is not None:
            raise ValueError(f"truncate={self.truncate!r} applies only with meta_grad='truncated' (got meta_grad={self.meta_grad!r})")
        if self.meta_grad != "unrolled" and self.first_order:
            raise ValueError(
                f"first_order=True drops the meta-gradient's second-order terms, which meta_grad={self.meta_grad!r} "
                "computes; use first_order=True with meta_grad='unrolled', or first_order=False"
            )
        if self.meta_grad != "implicit":
            return
        # iMAML differentiates the initial adapted weights only: anything else the support loss reads would miss
        # its path through the inner solution
        if self._learned_keys or len(self.inner_modules):
            raise ValueError(
                "meta_grad='implicit' gives learned inner hyperparameters or transforms no gradient (the inner "
                "solution does not depend on them); use learnable=None and a torch.optim inner optimizer, or "
                "meta_grad='unrolled'"
            )
        if adapt_params is not None:
            raise ValueError(
                f"meta_grad='implicit' adapts all parameters (adapt_params={adapt_params!r} would leave the "
                "non-adapted ones without their gradient through the inner solution); use adapt_params=None"
            )

    def _inner_loop(self, create_graph: bool) -> Callable[..., dict[str, Tensor]]:
        """Returns the inner loop of the ``meta_grad`` mode, taking ``inner_loop``'s arguments but ``first_order``."""
        if self.meta_grad == "implicit":
            return functools.partial(implicit_inner_loop, options=self.implicit)
        truncate = self.truncate if create_graph else None
        return functools.partial(inner_loop, first_order=self.first_order, truncate=truncate)

    def _add_learned(self, hp_name: str, spec: Learned) -> None:
        defaults = self._inner_hparams[self.adapted_names[0]]
        if hp_name not in defaults:
            known = sorted(k for k, v in defaults.items() if is_number_or_tuple(v))
            raise ValueError(
                f"learnable names {hp_name!r}, which is not a hyperparameter of the inner optimizer (it has {known}); "
                "learn one of those, or pick an inner optimizer that has it (betas: adam, adamax, nadam, radam)"
            )
        init = defaults[hp_name] if spec.init is None else spec.init
        if not is_number_or_tuple(init):
            raise ValueError(f"learnable {hp_name!r} starts at {init!r}; a learned hyperparameter must be a number or tuple of numbers")
        params = dict(self.model.named_parameters())
        keys: dict[str, str] = {}
        for name in self.adapted_names:
            group = spec.key(name)
            key = hp_name if not group else f"{hp_name}/{group.replace('.', '/')}"
            if key not in self.learned:
                param = params[name]
                start = torch.as_tensor(init, dtype=param.dtype, device=param.device)
                shape = tuple(start.shape) + spec.shape(param)
                value = start.reshape(tuple(start.shape) + (1,) * len(spec.shape(param))).expand(shape)
                self.learned[key] = nn.Parameter(value.clone())
            keys[name] = key
        self._learned_keys[hp_name] = keys

    # -- hyperparameters --------------------------------------------------------------------
    def inner_hparams(self) -> dict[str, dict[str, Any]]:
        """Returns each adapted parameter's inner hyperparameters: the inner optimizer's, with learned values in.

        Parameters without learned values share one mapping (so their steps can use foreach kernels).
        """
        hparams = {}
        for name in self.adapted_names:
            hp = self._inner_hparams[name]
            if self._learned_keys:
                hp = dict(hp)
                for hp_name, keys in self._learned_keys.items():
                    value = self.learned[keys[name]]
                    hp[hp_name] = tuple(value.unbind(0)) if isinstance(hp[hp_name], tuple) else value
            hparams[name] = hp
        return hparams

    def adapted_parameters(self) -> list[nn.Parameter]:
        """Returns the model's adapted parameters, in the order :meth:`learned_hyperparameters` lists values."""
        params = dict(self.model.named_parameters())
        return [params[n] for n in self.adapted_names]

    def learned_hyperparameters(self) -> dict[str, list[Any]]:
        """Returns the learned inner hyperparameters as an override ``{name: [value]}`` for one param group.

        The group is ``adapted_parameters()`` (``torch.optim.SGD(module.adapted_parameters(), lr=...)``);
        ``value`` is a tensor when all adapted parameters share it, else a list with one value per
        parameter. Use it with :func:`metaloop.optim.apply_trainable_opt_params` or as
        ``metaloop.innerloop_ctx(..., override=...)``. Values are detached copies.
        """
        hparams = self.inner_hparams()
        override: dict[str, list[Any]] = {}
        for hp_name, keys in self._learned_keys.items():
            values = [_detached(hparams[n][hp_name]) for n in self.adapted_names]
            shared = len(set(keys.values())) == 1
            override[hp_name] = [values[0] if shared else values]
        return override

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: Any,
        map_location: Any = None,
        hparams_file: Any = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        allow: Iterable[str] = (),
        **kwargs: Any,
    ) -> MetaLightningModule:
        """Returns the trained module of a checkpoint written by ``metaloop fit`` (see :func:`metaloop.lightning.runs.load_module`).

        The stored configuration builds only metaloop's own targets and those in ``allow`` (import paths or
        package prefixes ending in ``.``, e.g. ``allow=["mypkg.MyModel"]``; ``$METALOOP_ALLOW_TARGETS`` adds more).
        With constructor arguments in ``kwargs`` (a checkpoint of a module built in Python), Lightning's own loader.
        """
        if kwargs or hparams_file is not None:
            if weights_only is False:
                raise ValueError("weights_only must stay True: an unrestricted load would let the checkpoint run code")
            from metaloop.lightning.checkpoint import local_file

            with local_file(checkpoint_path) as local:  # Lightning's download would be unbounded and kept
                return super().load_from_checkpoint(local, map_location, hparams_file, strict, True, **kwargs)
        from metaloop.lightning.runs import load_module

        return load_module(checkpoint_path, map_location=map_location, strict=strict is not False, cls=cls, allow=allow)  # type: ignore[return-value]

    # -- hooks ------------------------------------------------------------------------------
    def inner_loss(self, fmodel: Callable[..., Tensor], support: Batch) -> Tensor:
        """Returns the loss the inner optimizer descends on one task's support set ``(x, y)``.

        ``fmodel(x)`` runs the model with the task's current fast weights. Runs under
        :func:`torch.func.vmap` when tasks are batched, so it must be free of data-dependent
        Python control flow and ``.item()``.
        """
        x, y = support
        return self.objective.loss(fmodel(x), y)

    def outer_loss(self, fmodel: Callable[..., Tensor], query: Batch) -> Tensor:
        """Returns one task's meta-training loss on its query set ``(x, y)``, given the adapted ``fmodel``."""
        x, y = query
        return self.objective.loss(fmodel(x), y)

    def task_metrics(self, fmodel: Callable[..., Tensor], batch: Batch) -> dict[str, Tensor]:
        """Returns one task's metrics (scalars, keys ``objective.metric_names``) on ``batch = (x, y)``."""
        x, y = batch
        return self.objective.metrics(fmodel(x), y)

    def adapt(
        self, support: Batch, steps: int | None = None, *, n_ways: int | None = None, create_graph: bool = False
    ) -> AdaptedModel:
        """Returns the model adapted to one task's support set ``(x, y)``, as a callable ``fmodel(x)``.

        Args:
            support: one task's inputs and targets (no task dimension).
            steps: inner steps (default ``eval_inner_steps``).
            n_ways: for a classifier, the task's number of classes. If it differs from the head's
                outputs, the head starts from zeros with ``n_ways`` outputs (common MAML practice for
                tasks with more ways than in training: all classes start equal, the support set
                separates them); per-element learned values of the head (Meta-SGD) are averaged over
                the trained classes. None keeps the trained head.
            create_graph: keep the graph to the initial weights and learned hyperparameters (training).
                False adapts without one (memory flat in ``steps``) and returns detached weights.

        Raises:
            ValueError: for an ``n_ways`` the head cannot take (see :meth:`_initial_weights`).
        """
        return self._adapt(support, steps, n_ways=n_ways, create_graph=create_graph, batched=False)

    def _adapt(
        self, support: Batch, steps: int | None, *, n_ways: int | None, create_graph: bool, batched: bool
    ) -> AdaptedModel:
        """:meth:`adapt`, also under :func:`torch.func.vmap` over tasks (``batched=True``)."""
        steps = self.eval_inner_steps if steps is None else steps
        with inner_grad_mode(create_graph):
            params, hparams = self._initial_weights(n_ways)
            fixed = {n: p for n, p in params.items() if n not in hparams}

            def support_loss(weights: dict[str, Tensor]) -> Tensor:
                return self.inner_loss(AdaptedModel(self.model, {**fixed, **weights}), support)

            adapted = self._inner_loop(create_graph)(
                support_loss,
                {n: params[n] for n in hparams},
                rule=self.rule,
                hparams=hparams,
                steps=steps,
                create_graph=create_graph,
                batched=batched,
            )
        return AdaptedModel(self.model, {**fixed, **adapted})

    def _initial_weights(self, n_ways: int | None) -> tuple[dict[str, Tensor], dict[str, dict[str, Any]]]:
        """Returns the weights and hyperparameters to adapt from, with the head resized to ``n_ways``."""
        params = dict(self.model.named_parameters())
        hparams = self.inner_hparams()
        if n_ways is None or self.head is None:
            return params, hparams
        head = self.model.get_submodule(self.head)
        if n_ways == head.out_features:
            return params, hparams
        head_names = [f"{self.head}.{n}" for n, _ in head.named_parameters()]
        if not all(n in hparams for n in head_names):
            raise ValueError(
                f"n_ways={n_ways} differs from the head's {head.out_features} outputs, but the head {self.head!r} does "
                "not adapt (adapt_params excludes it), so a new head would stay at zero; adapt the head or use "
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
                k: _resize_rows(v, old.shape, n_ways) if isinstance(v, Tensor) else v for k, v in hparams[name].items()
            }
        return params, hparams

    # -- tasks ------------------------------------------------------------------------------
    def _over_tasks(self, fn: Callable[..., Any], batch: Task) -> Iterator[tuple[bool, Any]]:
        """Yields ``(last, result)``: ``fn(*task, batched=...)`` over the meta-batch, with a leading task dimension.

        The one place the meta-batch is either vmapped (one chunk holding every task: one
        backward) or looped over (one chunk per task: the graph of one task at a time, and a
        caller can backpropagate each chunk before the next is computed).
        """
        batch = Task(*(to_memory_format(field, self._input_format) for field in batch))
        if self.batched:
            # plain-operation normalization layers: PyTorch's batching rules drop second-order terms (metaloop.nn.plain_norms)
            with exact_norms():
                result = torch.func.vmap(functools.partial(fn, batched=True))(*batch)
            yield True, result
            return
        tasks = batch.support_x.shape[0]
        for i in range(tasks):
            result = fn(*(field[i] for field in batch), batched=False)
            yield i == tasks - 1, _recursive_map(result, lambda t: t.unsqueeze(0))

    # -- training ---------------------------------------------------------------------------
    def _task_loss(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, *, batched: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Returns one task's outer loss and its (detached) query metrics after adaptation.

        The metrics are of the very forward pass the loss saw (not a second one: same numbers, and
        one forward of the query set fewer per task).
        """
        fmodel = _LastCall(self._adapt((support_x, support_y), self.inner_steps, n_ways=None, create_graph=True, batched=batched))
        loss = self.outer_loss(fmodel, (query_x, query_y))
        with torch.no_grad():
            metrics = self.task_metrics(fmodel.replay, (query_x, query_y))
        return loss, metrics

    def _backward(self, loss: Tensor, sync: bool) -> None:
        """Backpropagates ``loss``; under DDP, all-reduces only if ``sync``. Outside a Trainer, plain ``backward``."""
        if self._trainer is None:
            loss.backward()
            return
        strategy = self.trainer.strategy
        blocked = not sync and isinstance(strategy, ParallelStrategy)
        with strategy.block_backward_sync() if blocked else contextlib.nullcontext():
            self.manual_backward(loss)

    def meta_gradient(self, batch: Task) -> tuple[Tensor, dict[str, Tensor]]:
        """Returns the meta-batch's mean query loss and mean query metrics, detached, after adding its
        meta-gradient to the ``.grad`` of this module's parameters (what :meth:`training_step` steps on).

        Task by task, each task's graph is freed by its backward before the next task is adapted
        (memory of one task; under DDP only the last backward all-reduces); under vmap, one backward.
        Works outside a Trainer too (benchmarks, notebooks).
        """
        tasks = batch.support_x.shape[0]
        losses, per_chunk = [], []
        for last, (chunk_losses, chunk_metrics) in self._over_tasks(self._task_loss, batch):
            self._backward(chunk_losses.sum() / tasks, sync=last)
            losses.append(chunk_losses.detach())
            per_chunk.append(chunk_metrics)
        metrics = {k: torch.cat([m[k] for m in per_chunk]).mean() for k in per_chunk[0]}
        return torch.cat(losses).mean(), metrics

    def training_step(self, batch: Task, batch_idx: int) -> Tensor:
        """Returns the mean query loss of the meta-batch, after one outer step on its :meth:`meta_gradient`."""
        optimizer = self.optimizers()
        optimizer.zero_grad()
        loss, metrics = self.meta_gradient(batch)
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        metrics["loss"] = loss
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, prog_bar=True)
        if len(self.learned):  # each log_dict call costs Lightning's bookkeeping, even empty
            self.log_dict({f"hp/{k}": v.detach().float().mean() for k, v in self.learned.items()})
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = self.outer_optim(self.parameters())
        if self.scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler(optimizer), "interval": "step"}}

    # -- evaluation -------------------------------------------------------------------------
    def _evaluate_task(
        self, n_ways: int | None, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, *, batched: bool
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Returns one task's query metrics before and after adaptation."""
        params, _ = self._initial_weights(n_ways)
        with torch.no_grad():
            before = self.task_metrics(AdaptedModel(self.model, params), (query_x, query_y))
        fmodel = self._adapt((support_x, support_y), self.eval_inner_steps, n_ways=n_ways, create_graph=False, batched=batched)
        with torch.no_grad():
            after = self.task_metrics(fmodel, (query_x, query_y))
        return before, after

    def _evaluation_step(self, batch: Task, stage: str) -> None:
        with torch.inference_mode(False):
            # tensors made under inference mode cannot enter autograd; copies made outside it can
            batch = Task(*(field.clone() for field in batch))
        n_ways = self.objective.output_size(batch.support_y)
        chunks = [result for _, result in self._over_tasks(functools.partial(self._evaluate_task, n_ways), batch)]
        before = {k: torch.cat([c[0][k] for c in chunks]) for k in chunks[0][0]}
        after = {k: torch.cat([c[1][k] for c in chunks]) for k in chunks[0][1]}
        for when, metrics in (("pre", before), ("post", after)):
            for name, values in metrics.items():
                key = f"{stage}_{name}_{when}"
                if key not in self.eval_metrics:
                    raise KeyError(
                        f"task_metrics returned {name!r}, which is not in objective.metric_names "
                        f"{self.objective.metric_names}; add it there so that it is aggregated"
                    )
                self.eval_metrics[key].update(values)

    def _log_evaluation(self, stage: str) -> None:
        for key, metric in self.eval_metrics.items():
            if not key.startswith(f"{stage}_"):
                continue
            if metric.update_count == 0 and self.trainer.world_size == 1:
                continue
            mean, half_width = metric.compute()
            name = key[len(stage) + 1 :]
            # already reduced over ranks by the metric; sync_dist only marks the value as global
            self.log(f"{stage}/{name}", mean.float(), prog_bar=name.endswith("_post"), sync_dist=True)
            self.log(f"{stage}/{name}_ci95", half_width.float(), sync_dist=True)
            metric.reset()

    def validation_step(self, batch: Task, batch_idx: int) -> None:
        self._evaluation_step(batch, "val")

    def test_step(self, batch: Task, batch_idx: int) -> None:
        self._evaluation_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    # -- checks -----------------------------------------------------------------------------
    def check_task(self, task: Task, stage: str = "fit") -> None:
        """Raises ``ValueError`` if the model or objective cannot handle ``task`` (one task, no task dimension).

        In training the model's own head must fit the task; in evaluation a classifier's head may
        be re-sized (see :meth:`adapt`).
        """
        n_ways = None if stage == "fit" else self.objective.output_size(task.support_y)
        params, _ = self._initial_weights(n_ways)
        with torch.no_grad():
            try:
                output = AdaptedModel(self.model, params)(task.support_x)
            except (RuntimeError, ValueError, TypeError, IndexError) as err:
                raise ValueError(
                    f"{type(self.model).__name__} cannot run on the task's support inputs of shape "
                    f"{tuple(task.support_x.shape)} ({str(err).splitlines()[0]}); choose a model for this task's inputs"
                ) from err
        self.objective.check(output, task.support_y)

    def check_datamodule(self, datamodule: lightning.LightningDataModule, stage: str) -> None:
        """Raises ``ValueError`` if the first task ``stage`` would use cannot be handled (see :meth:`check_task`).

        ``stage`` is ``"fit"``, ``"validate"`` or ``"test"``; data modules other than
        :class:`MetaDataModule`, and evaluation stages without tasks, are not checked.
        """
        if not isinstance(datamodule, MetaDataModule) or stage not in _STAGE_SPLITS:
            return
        if (stage == "validate" and not datamodule.num_val_tasks) or (stage == "test" and not datamodule.num_test_tasks):
            return
        self.check_task(sample_task(datamodule.tasks, _STAGE_SPLITS[stage], datamodule.seed, 0), stage)

    def setup(self, stage: str) -> None:
        """Checks the Trainer's precision and the attached data module's tasks before any step runs, and
        chooses ``batch_tasks="auto"`` and ``memory_format="auto"`` for the Trainer's device and precision.

        Raises:
            ValueError: for a precision the inner loop cannot take (see :func:`~metaloop.lightning.precision.check_precision`).
        """
        check_precision(self.trainer.precision)
        device_type = self.trainer.strategy.root_device.type
        self.batched = self._choose_batching(self.batch_tasks, device_type, str(self.trainer.precision))
        self._input_format = resolve_memory_format(
            self.memory_format, self.model, device_type, str(self.trainer.precision), self.batched
        )
        self.model.to(memory_format=self._input_format)
        self.check_datamodule(self.trainer.datamodule, stage)


def _resize_rows(value: Tensor, shape: torch.Size, rows: int) -> Tensor:
    """Returns a per-element value of a head parameter of ``shape`` for ``rows`` outputs: the mean over trained rows."""
    if tuple(value.shape[-len(shape):]) != tuple(shape) or len(shape) == 0:
        return value
    lead = value.ndim - len(shape)
    mean = value.mean(dim=lead, keepdim=True)
    return mean.expand(*value.shape[:lead], rows, *shape[1:])

