"""learn2learn's ``learn2learn.nn`` (implemented in :mod:`metaloop.nn`): layers, metalayers, Kronecker maps, heads.

A package, so learn2learn's module paths resolve: ``learn2learn.nn.kroneckers``,
``.misc``, ``.protonet``, ``.metaoptnet``, ``.metalayers``.
"""

from __future__ import annotations

from metaloop.compat.learn2learn.nn import kroneckers, metalayers, metaoptnet, misc, protonet
from metaloop.compat.learn2learn.nn.kroneckers import KroneckerConv2d, KroneckerLinear, KroneckerLSTM, KroneckerRNN
from metaloop.compat.learn2learn.nn.metalayers import MetaModule, ParameterTransform
from metaloop.compat.learn2learn.nn.metaoptnet import SVClassifier
from metaloop.compat.learn2learn.nn.misc import Flatten, Lambda, Scale, freeze, unfreeze
from metaloop.compat.learn2learn.nn.protonet import PrototypicalClassifier

__all__ = [
    "KroneckerLinear",
    "KroneckerRNN",
    "KroneckerLSTM",
    "KroneckerConv2d",
    "Lambda",
    "Flatten",
    "Scale",
    "freeze",
    "unfreeze",
    "MetaModule",
    "ParameterTransform",
    "PrototypicalClassifier",
    "SVClassifier",
    "kroneckers",
    "misc",
    "protonet",
    "metaoptnet",
    "metalayers",
]
