"""Neural-network building blocks: Kronecker-factored linear maps for learned update rules, and few-shot vision backbones.

Imports only torch. :mod:`metaloop.transforms` builds gradient transforms from these.
"""

from __future__ import annotations

from metaloop.nn.kronecker import (
    KroneckerConv2d,
    KroneckerLinear,
    KroneckerLSTM,
    KroneckerRNN,
    kronecker_matvec,
)

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
]
