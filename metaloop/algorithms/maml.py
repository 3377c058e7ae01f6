"""Gradient-based meta-learning: an inner loop per task inside Lightning's outer loop (MAML and its family).

:class:`MetaLightningModule` adapts the model to each task of a meta-batch with a differentiable
inner optimizer (:func:`metaloop.optim.loop.inner_trajectory` with the rule the optimizer table gives
its inner optimizer: any ``torch.optim`` algorithm, or a learned gradient transform), scores the adapted
model on the task's query set, and steps an outer optimizer on the mean query loss. MAML, first-order
MAML, ANIL, BOIL, Meta-SGD, per-layer, per-step or Adam-hyperparameter learning, Meta-Curvature and
Kronecker-factored MAML are choices of its arguments, not subclasses. Algorithms that change the inner
loop itself (MAML++, Reptile, CAVIA) subclass it through its public hooks:

- :meth:`~MetaLightningModule.initial_weights`: the weights and hyperparameters a task's adaptation
  starts from, for ``n_ways`` classes (CAVIA: a zero context);
- :meth:`~MetaLightningModule.step_hparams`: the hyperparameters of inner step ``k`` (per-step learned values);
- :meth:`~MetaLightningModule.model_at`: the model after ``k`` inner steps (MAML++'s per-step BatchNorm);
- :meth:`~MetaLightningModule.support_at`: the examples of inner step ``k`` (Reptile's mini-batches);
- :meth:`~MetaLightningModule.inner_loss`, :meth:`~MetaLightningModule.outer_loss`,
  :meth:`~MetaLightningModule.task_metrics`: what a task is scored by;
- :meth:`~MetaLightningModule.trajectory`: the model after 0, 1, ..., k inner steps;
- :meth:`~MetaLightningModule.is_first_order`: whether this meta-step drops second-order terms (MAML++'s annealing);
- :meth:`~MetaLightningModule.task_loss`: one task's meta-training loss (MAML++'s multi-step loss);
- :meth:`~MetaLightningModule.meta_gradient`: the meta-gradient of a meta-batch (Reptile's ``theta - mean(phi)``).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from metaloop.algorithms import folding
from metaloop.algorithms import inner as parts
from metaloop.algorithms.adapted_model import AdaptedModel
from metaloop.algorithms.base import Batch, MetaLearner, OptimizerFactory
from metaloop.algorithms.compiled import CompiledMetaStep, compiled_meta_step
from metaloop.algorithms.learned import Learned
from metaloop.algorithms.objectives import Objective
from metaloop.algorithms.options import InnerOptions
from metaloop.nn.folded import try_fold
from metaloop.optim.implicit import implicit_inner_loop
from metaloop.optim.loop import inner_trajectory
from metaloop.tasks import Task
from metaloop.utils import _recursive_map

__all__ = ["MetaLightningModule", "inner_grad_mode"]


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

    def __init__(self, fmodel: Callable[..., Any]) -> None:
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


class MetaLightningModule(MetaLearner):
    """A learner that meta-learns ``model``'s initial weights, learned inner hyperparameters and transforms.

    Each training step adapts the model to each task's support set with ``inner.steps`` steps of the
    inner optimizer, scores the query set with :meth:`outer_loss`, and adds the meta-gradient of the mean
    query loss (:meth:`meta_gradient`). Validation and test adapt for ``inner.eval_steps`` steps without a
    higher-order graph and log pre- and post-adaptation metrics (``test/acc_pre``, ``test/acc_post_ci95``).

    Args:
        model: the network; its ``head`` (or last ``nn.Linear``) is the classifier head.
        objective: the task's loss and metrics (:class:`~metaloop.algorithms.Classification`, ``Regression``).
        inner: the inner loop's options (:class:`~metaloop.algorithms.InnerOptions`, or a mapping of its fields).
        inner_optim: a ``torch.optim`` optimizer class or partial (``functools.partial(torch.optim.SGD, lr=0.4)``);
            called once on the adapted parameters, to read its hyperparameters. Values that are modules (a
            :class:`~metaloop.transforms.TransformOptimizer`'s learned transforms) become submodules in
            :attr:`inner_modules`, trained by the outer optimizer. Any optimizer of the optimizer table
            (:data:`metaloop.optim.OPTIMIZERS`, extended by :func:`metaloop.optim.register_optim`) works.
        outer_optim: an optimizer partial, called on all trainable parameters of this module.
        learnable: which inner hyperparameters are learned, e.g. ``{"lr": PerElement()}`` (Meta-SGD),
            ``{"lr": PerLayer()}``, ``{"lr": PerStep(PerLayer(), 5)}``, ``{"betas": Shared()}``. Learned values are
            ``nn.Parameter``s in :attr:`learned`; :meth:`learned_hyperparameters` exports them.
        head: the name of the classifier module, re-created for :meth:`adapt` with another ``n_ways``.
        compile: compile the folded meta-step with :func:`torch.compile` (:mod:`metaloop.algorithms.compiled`; the
            disk cache spares a second run the compile): True, False, or None where it wins for the run's length.
        kwargs: :class:`~metaloop.algorithms.MetaLearner`'s (``scheduler``, ``memory_format``).

    Batching (``inner.batch_tasks``, all exact): ``"fold"``, tasks folded into channels (:mod:`metaloop.algorithms.folding`);
    ``"vmap"`` with plain-operation norms (:func:`metaloop.nn.exact_norms`); ``"sequential"`` task by task (under DDP
    only the last task's backward synchronises); ``"auto"``: the first exact path of :data:`~metaloop.algorithms.inner.AUTO_BATCHING`.

    Precision: under ``trainer.precision="bf16-mixed"`` the inner loop's forward and backward passes run
    under bfloat16 autocast while weights, fast weights, inner optimizer state and learned hyperparameters
    stay float32; ``"16-mixed"`` and 16-bit weights are refused in :meth:`setup`.

    Raises:
        ValueError: at construction, for options :class:`InnerOptions` refuses, an ``inner.params`` pattern that
            matches no parameter, a learned name that is not a hyperparameter of the inner optimizer,
            ``batch_tasks="vmap"`` for a model with buffers, or ``meta_grad="implicit"`` with learned
            hyperparameters, transforms or a subset of adapted parameters.
    """

    #: the adapted parameters when ``inner.params`` is None (a regular expression; None: every parameter)
    default_params: str | None = None
    #: what to do when no parameter is adapted (the end of the constructor's error message)
    params_fix: str = "fix the pattern"

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        inner: InnerOptions | Mapping[str, Any] | None,
        inner_optim: OptimizerFactory,
        outer_optim: OptimizerFactory,
        *,
        learnable: Mapping[str, Learned] | None = None,
        head: str | None = None,
        compile: bool | None = None,
        **kwargs: Any,
    ) -> None:
        inner = InnerOptions.of(inner)
        super().__init__(model, objective, outer_optim, **kwargs)
        self.save_hyperparameters({"inner": {k: v for k, v in vars(inner).items() if k != "implicit"}, "head": head, "compile": compile})
        self.inner = inner
        self.head = parts.find_head(model, head)
        self.adapted_names = parts.select_adapted(
            model, inner.params if inner.params is not None else self.default_params, self.params_fix
        )
        self.rule, self._inner_hparams = parts.read_inner_optimizer(model, self.adapted_names, inner_optim, inner.lr)
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
        self._learnable: dict[str, Learned] = {}
        for hp_name, spec in (learnable or {}).items():
            self.learn(hp_name, spec)
        parts.refuse_for_implicit(inner, self.inner_modules)
        # the folded network (None where it cannot fold); a learner whose hooks see one task is never folded
        self.folded, _ = try_fold(model)
        self.batching = parts.choose_batching(
            model, inner.batch_tasks, inner.first_order, "cpu", folding.fold_learner_problems(self, MetaLightningModule)
        )
        #: whether the folded meta-step is compiled (True, False; None: where it wins, :func:`~metaloop.algorithms.compiled.compile_wins`)
        self.compile_meta_step = compile
        #: the compiled meta-step (:mod:`metaloop.algorithms.compiled`), made in :meth:`setup` as ``compile`` says
        self.compiled: CompiledMetaStep | None = None

    def learn(self, hp_name: str, spec: Learned) -> None:
        """Learns inner hyperparameter ``hp_name`` as ``spec`` says (see ``learnable``); a subclass's constructor may call it.

        Raises:
            ValueError: as for ``learnable``, or when ``hp_name`` is learned already, or with ``meta_grad="implicit"``.
        """
        if hp_name in self._learnable:
            raise ValueError(f"{hp_name!r} is learned already ({type(self._learnable[hp_name]).__name__}); learn it once")
        if self.inner.meta_grad == "implicit":
            raise ValueError(
                "meta_grad='implicit' gives learned inner hyperparameters or transforms no gradient (the inner "
                "solution does not depend on them); use learnable=None and a torch.optim inner optimizer, or "
                "meta_grad='unrolled'"
            )
        values, keys = parts.learned_values(
            self.model, self.adapted_names, self._inner_hparams[self.adapted_names[0]], hp_name, spec
        )
        for key, value in values.items():
            self.learned[key] = value
        self._learned_keys[hp_name], self._learnable[hp_name] = keys, spec

    # -- hyperparameters ------------------------------------------------------------------------
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

    # -- hooks: the inner loop ------------------------------------------------------------------
    def initial_weights(self, n_ways: int | None = None) -> tuple[dict[str, Tensor], dict[str, dict[str, Any]]]:
        """Returns the weights a task's adaptation starts from, and the adapted ones' hyperparameters.

        With ``n_ways`` other than the head's outputs, the head starts from zeros with ``n_ways`` outputs
        (all classes start equal; the support set separates them) and its per-element learned values are
        averaged over the trained classes.
        """
        params = dict(self.model.named_parameters())
        hparams = self.inner_hparams()
        if n_ways is None or self.head is None:
            return params, hparams
        head = self.model.get_submodule(self.head)
        if n_ways != head.out_features:
            elementwise = {hp for hp, spec in self._learnable.items() if spec.elementwise()}
            parts.resize_head(params, hparams, head, self.head, n_ways, keep=lambda hp: hp in self._learnable and hp not in elementwise)
        return params, hparams

    def step_hparams(self, hparams: dict[str, dict[str, Any]], step: int) -> dict[str, dict[str, Any]]:
        """Returns the hyperparameters of inner step ``step``: row ``min(step, steps - 1)`` of per-step learned values."""
        per_step = {hp: spec.steps() for hp, spec in self._learnable.items() if spec.steps() is not None}
        if not per_step:
            return hparams

        def row(value: Any, steps: int) -> Any:
            k = min(step, steps - 1)
            return tuple(v[k] for v in value) if isinstance(value, tuple) else value[k]

        return {
            name: {hp: row(value, per_step[hp]) if hp in per_step else value for hp, value in values.items()}
            for name, values in hparams.items()
        }

    def model_at(self, step: int, weights: Mapping[str, Tensor]) -> Callable[..., Any]:
        """Returns the model run with ``weights``, the weights after ``step`` inner steps."""
        return AdaptedModel(self.model, weights)

    def support_at(self, support: Any, step: int) -> Batch:
        """Returns the examples inner step ``step`` descends on: the whole support set ``(x, y)`` (Reptile: a mini-batch)."""
        return support

    def inner_loss(self, fmodel: Callable[..., Tensor], support: Batch) -> Tensor:
        """Returns the loss the inner optimizer descends on one task's support set ``(x, y)`` (see :meth:`support_at`).

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

    def is_first_order(self) -> bool:
        """True if this meta-step drops second-order terms (``inner.first_order``)."""
        return self.inner.first_order

    def trajectory(
        self, support: Any, steps: int | None = None, *, n_ways: int | None = None, create_graph: bool = False,
        batched: bool = False,
    ) -> Iterator[Callable[..., Any]]:
        """Returns an iterator over the model after 0, 1, ..., ``steps`` inner steps on ``support`` (:meth:`model_at`).

        ``steps`` defaults to ``inner.eval_steps``. With ``create_graph`` the graph to the initial weights and
        learned hyperparameters is kept (training; truncated to the last ``inner.truncate`` steps with
        ``meta_grad="truncated"``); without it, adaptation runs with gradients enabled but returns detached
        weights. With ``meta_grad="implicit"`` only the initial and final models are given.
        """
        steps = self.inner.eval_steps if steps is None else steps
        params, hparams = self.initial_weights(n_ways)
        fixed = {n: p for n, p in params.items() if n not in hparams}

        def support_loss(weights: dict[str, Tensor], step: int) -> Tensor:
            return self.inner_loss(self.model_at(step, {**fixed, **weights}), self.support_at(support, step))

        start = {n: params[n] for n in hparams}
        if self.inner.meta_grad == "implicit":
            adapted = implicit_inner_loop(
                lambda weights: support_loss(weights, 0), start, rule=self.rule, hparams=hparams, steps=steps,
                create_graph=create_graph, batched=batched, options=self.inner.implicit,
            )
            final: Iterator[dict[str, Tensor]] = iter([adapted])
            indices: Iterator[int] = iter([steps])
        else:
            final = inner_trajectory(
                support_loss, start, rule=self.rule, hparams=[self.step_hparams(hparams, k) for k in range(steps)],
                steps=steps, first_order=self.is_first_order(), create_graph=create_graph, batched=batched,
                truncate=self.inner.truncate if create_graph else None,
            )
            indices = itertools.count(1)
        models = (self.model_at(k, {**fixed, **w}) for k, w in zip(indices, final))
        return itertools.chain([self.model_at(0, params)], models)

    def adapt(  # type: ignore[override]
        self, support: Batch, steps: int | None = None, *, n_ways: int | None = None, create_graph: bool = False,
        batched: bool = False,
    ) -> Callable[..., Any]:
        """Returns the model adapted to one task's support set ``(x, y)``, as a callable ``fmodel(x)``.

        Args:
            support: one task's inputs and targets (no task dimension).
            steps: inner steps (default ``inner.eval_steps``).
            n_ways: for a classifier, the task's number of classes; if it differs from the head's outputs,
                the head is re-created (see :meth:`initial_weights`). None keeps the trained head.
            create_graph: keep the graph to the initial weights and learned hyperparameters (training).
                False adapts without one (memory flat in ``steps``) and returns detached weights.
            batched: True under :func:`torch.func.vmap` over tasks.

        Raises:
            ValueError: for an ``n_ways`` the head cannot take (see :func:`metaloop.algorithms.inner.resize_head`).
        """
        with inner_grad_mode(create_graph):
            for fmodel in self.trajectory(support, steps, n_ways=n_ways, create_graph=create_graph, batched=batched):
                pass  # the last step's model
        return fmodel

    # -- hooks: training ------------------------------------------------------------------------
    def task_loss(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, *, batched: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Returns one task's outer loss and its (detached) query metrics after ``inner.steps`` steps.

        The metrics are of the very forward pass the loss saw (not a second one).
        """
        fmodel = _LastCall(self.adapt((support_x, support_y), self.inner.steps, create_graph=True, batched=batched))
        loss = self.outer_loss(fmodel, (query_x, query_y))
        with torch.no_grad():
            metrics = self.task_metrics(fmodel.replay, (query_x, query_y))
        return loss, metrics

    def meta_gradient(self, batch: Task) -> tuple[Tensor, dict[str, Tensor]]:
        """Returns the meta-batch's mean query loss and mean query metrics, detached, after adding its
        meta-gradient to the ``.grad`` of this module's parameters (what :meth:`training_step` steps on).

        Task by task, each task's graph is freed by its backward before the next task is adapted
        (memory of one task; under DDP only the last backward all-reduces); under vmap, one backward.
        """
        if self.batching == "fold":
            return folding.folded_meta_gradient(self, batch)
        tasks = batch.support_x.shape[0]
        losses, per_chunk = [], []
        for last, (chunk_losses, chunk_metrics) in self.over_tasks(self.task_loss, batch):
            self.meta_backward(chunk_losses.sum() / tasks, sync=last)
            losses.append(chunk_losses.detach())
            per_chunk.append(chunk_metrics)
        metrics = {k: torch.cat([m[k] for m in per_chunk]).mean() for k in per_chunk[0]}
        return torch.cat(losses).mean(), metrics

    def training_step(self, batch: Task, batch_idx: int) -> Tensor:
        """Returns the mean query loss of the meta-batch after one outer step; logs learned hyperparameters' means."""
        loss = super().training_step(batch, batch_idx)
        if len(self.learned):  # each log_dict call costs Lightning's bookkeeping, even empty
            self.log_dict({f"hp/{k}": v.detach().float().mean() for k, v in self.learned.items()})
        return loss

    # -- hooks: evaluation ----------------------------------------------------------------------
    def evaluate_task(
        self, n_ways: int | None, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, *, batched: bool
    ) -> dict[str, dict[str, Tensor]]:
        """Returns one task's query metrics before (``"pre"``) and after (``"post"``) adaptation."""
        params, _ = self.initial_weights(n_ways)
        with torch.no_grad():
            before = self.task_metrics(self.model_at(0, params), (query_x, query_y))
        fmodel = self.adapt((support_x, support_y), n_ways=n_ways, batched=batched)
        with torch.no_grad():
            after = self.task_metrics(fmodel, (query_x, query_y))
        return {"pre": before, "post": after}

    def evaluate_tasks(self, n_ways: int | None, batch: Task) -> dict[str, dict[str, Tensor]]:
        if self.batching == "fold":
            return folding.folded_evaluation(self, n_ways, batch)
        return super().evaluate_tasks(n_ways, batch)

    def setup(self, stage: str) -> None:
        """As :meth:`MetaLearner.setup`, then compiles the folded meta-step where ``compile`` says (:func:`compiled_meta_step`)."""
        super().setup(stage)
        self.compiled = compiled_meta_step(self, stage)
        if self.compiled is not None:
            self.batching_trials = ()  # the compiled meta-step is the folded one

    def choose_batching(self, device_type: str, precision: str) -> parts.Batching:
        return self.batching_candidates(device_type, precision)[0]

    def batching_candidates(self, device_type: str, precision: str) -> tuple[parts.Batching, ...]:
        problems = folding.fold_learner_problems(self, MetaLightningModule)
        return parts.exact_batchings(self.model, self.inner.batch_tasks, self.inner.first_order, device_type, problems)
