"""learn2learn's ``learn2learn.nn.metaoptnet`` (implemented in :mod:`metaloop.nn.svm`, in plain torch: no qpth needed)."""

from __future__ import annotations

from metaloop.nn.svm import SVClassifier, svm_logits

__all__ = ["SVClassifier", "svm_logits"]
