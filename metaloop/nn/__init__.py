"""Neural-network building blocks: Kronecker-factored linear maps, small layers, metalayers, per-step BatchNorm, few-shot heads and vision backbones.

Imports only torch. :mod:`metaloop.transforms` builds gradient transforms from the Kronecker
modules; :mod:`metaloop.lightning` fits the heads (:class:`PrototypicalClassifier`,
:class:`SVClassifier`) on each task's support set.
"""

from __future__ import annotations

from metaloop.nn.kronecker import (
    KroneckerConv2d,
    KroneckerLinear,
    KroneckerLSTM,
    KroneckerRNN,
    kronecker_matvec,
)
from metaloop.nn.layers import Flatten, Lambda, Scale, freeze, unfreeze
from metaloop.nn.metalayers import MetaModule, ParameterTransform
from metaloop.nn.per_step import PerStepBatchNorm2d, PerStepConv4
from metaloop.nn.plain_norms import exact_norms
from metaloop.nn.prototypical import PrototypicalClassifier, compute_prototypes, prototype_logits
from metaloop.nn.svm import SVClassifier, project_simplex, svm_dual, svm_logits

from metaloop.nn.vision import (
    CNN4,
    WRN28,
    CNN4Backbone,
    ConvBase,
    ConvBlock,
    DropBlock,
    LinearBlock,
    MiniImagenetCNN,
    OmniglotCNN,
    OmniglotFC,
    ResNet12,
    ResNet12Backbone,
    WRN28Backbone,
    fc_init_,
    maml_init_,
)

__all__ = [
    "exact_norms",
    "kronecker_matvec",
    "KroneckerLinear",
    "KroneckerConv2d",
    "KroneckerRNN",
    "KroneckerLSTM",
    "maml_init_",
    "fc_init_",
    "LinearBlock",
    "ConvBlock",
    "ConvBase",
    "OmniglotFC",
    "OmniglotCNN",
    "CNN4Backbone",
    "CNN4",
    "MiniImagenetCNN",
    "DropBlock",
    "ResNet12Backbone",
    "ResNet12",
    "WRN28Backbone",
    "WRN28",
    "Lambda",
    "Flatten",
    "Scale",
    "freeze",
    "unfreeze",
    "MetaModule",
    "ParameterTransform",
    "PerStepBatchNorm2d",
    "PerStepConv4",
    "compute_prototypes",
    "prototype_logits",
    "PrototypicalClassifier",
    "project_simplex",
    "svm_dual",
    "svm_logits",
    "SVClassifier",
]
