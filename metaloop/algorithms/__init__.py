"""The learners: every algorithm a small subclass of one base, :class:`MetaLearner`.

- :mod:`~metaloop.algorithms.base`: :class:`MetaLearner`, what every learner shares (outer optimizer,
  evaluation with 95% intervals, data checks, precision, checkpoints, ``adapt``).
- :mod:`~metaloop.algorithms.options`: :class:`InnerOptions`, the inner loop's options as one typed object.
- :mod:`~metaloop.algorithms.maml`: :class:`MetaLightningModule`, gradient-based meta-learning (MAML, FOMAML,
  ANIL, BOIL, Meta-SGD, learned inner optimizers, truncated and implicit meta-gradients) and its public hooks.
- :mod:`~metaloop.algorithms.mamlpp`: :class:`MAMLPlusPlus`; :mod:`~metaloop.algorithms.reptile`:
  :class:`ReptileModule`; :mod:`~metaloop.algorithms.cavia`: :class:`CaviaModule`.
- :mod:`~metaloop.algorithms.metric`: :class:`PrototypicalModule` (Prototypical Networks, MetaOptNet).
- :mod:`~metaloop.algorithms.objectives`, :mod:`~metaloop.algorithms.learned`,
  :mod:`~metaloop.algorithms.adapted_model`: what a task is scored by, how inner hyperparameters are
  learned, and a model run with a task's adapted weights.

``docs/extending.md`` shows how to add an algorithm in one file.
"""

from __future__ import annotations

from metaloop.algorithms.adapted_model import AdaptedModel
from metaloop.algorithms.base import MetaLearner
from metaloop.algorithms.learned import Learned, PerElement, PerLayer, PerStep, PerTensor, Shared
from metaloop.algorithms.objectives import Classification, Objective, Regression
from metaloop.algorithms.options import InnerOptions
from metaloop.algorithms.maml import MetaLightningModule
from metaloop.algorithms.mamlpp import MAMLPlusPlus, StepModel, msl_weights
from metaloop.algorithms.reptile import ReptileModule, mini_batches
from metaloop.algorithms.cavia import CaviaModule
from metaloop.algorithms.metric import FewShotHead, PrototypicalModule, head_logits

__all__ = [
    "MetaLearner",
    "InnerOptions",
    "MetaLightningModule",
    "MAMLPlusPlus",
    "ReptileModule",
    "CaviaModule",
    "PrototypicalModule",
    "AdaptedModel",
    "StepModel",
    "Objective",
    "Classification",
    "Regression",
    "Learned",
    "Shared",
    "PerLayer",
    "PerTensor",
    "PerElement",
    "PerStep",
    "FewShotHead",
    "head_logits",
    "msl_weights",
    "mini_batches",
]
