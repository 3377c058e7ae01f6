"""learn2learn's ``learn2learn.nn.protonet`` (implemented in :mod:`metaloop.nn.prototypical`)."""

from __future__ import annotations

from metaloop.nn.prototypical import PrototypicalClassifier, compute_prototypes

__all__ = ["PrototypicalClassifier", "compute_prototypes"]
