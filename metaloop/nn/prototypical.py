"""Prototypical Networks' classifier head (Snell et al. 2017): class means of support embeddings, logits = -distance.

:func:`compute_prototypes` and :func:`prototype_logits` are the pure core;
:class:`PrototypicalClassifier` (learn2learn's API: ``fit_(support, labels)`` then
``classifier(query)``) and :class:`metaloop.lightning.PrototypicalModule` call them.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

__all__ = [
    "compute_prototypes",
    "euclidean_distance",
    "cosine_distance",
    "normalize_rows",
    "prototype_logits",
    "PrototypicalClassifier",
    "DISTANCES",
]

EPS = 1e-8

Distance = Callable[[Tensor, Tensor], Tensor]


def compute_prototypes(support: Tensor, labels: Tensor) -> Tensor:
    """Returns the mean support embedding of each class, shape ``(n_classes, *support.shape[1:])``.

    Classes are ordered as ``torch.unique(labels)`` (sorted), so with labels ``0..n-1`` row
    ``c`` is class ``c``'s prototype. Differentiable in ``support``.

    Raises:
        ValueError: if ``labels`` is not one label per row of ``support``.
    """
    if labels.dim() != 1 or labels.numel() != support.size(0):
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but support has {support.size(0)} rows; give one label per row"
        )
    _, inverse = torch.unique(labels, return_inverse=True)
    onehot = torch.nn.functional.one_hot(inverse).to(support.dtype).t()  # (n_classes, n_support)
    sums = onehot @ support.reshape(support.size(0), -1)
    return (sums / onehot.sum(dim=1, keepdim=True)).reshape(-1, *support.shape[1:])


def euclidean_distance(prototypes: Tensor, queries: Tensor) -> Tensor:
    """Returns the squared Euclidean distances ``||q_i - p_c||^2``, shape ``(n_queries, n_classes)``."""
    return (queries.unsqueeze(1) - prototypes.unsqueeze(0)).pow(2).sum(dim=2)


def cosine_distance(prototypes: Tensor, queries: Tensor) -> Tensor:
    """Returns ``-<q_i, p_c>``, shape ``(n_queries, n_classes)``: the cosine distance (up to 1) of unit-norm rows."""
    return -queries @ prototypes.t()


def normalize_rows(x: Tensor, epsilon: float = EPS) -> Tensor:
    """Returns ``x`` with each row divided by its L2 norm (plus ``epsilon``)."""
    return x / (x.norm(p=2, dim=1, keepdim=True) + epsilon)


DISTANCES: dict[str, Distance] = {"euclidean": euclidean_distance, "cosine": cosine_distance}


def prototype_logits(
    support: Tensor,
    labels: Tensor,
    query: Tensor,
    distance: str | Distance = "euclidean",
    normalize: bool = False,
) -> Tensor:
    """Returns ``-distance(prototype_c, q_i)`` for each query row and class, shape ``(n_queries, n_classes)``.

    Embeddings are flattened to rows; ``normalize`` (implied by ``distance="cosine"``) scales
    support, prototypes and queries to unit norm as learn2learn does.
    """
    distance_fn, normalize = _distance(distance, normalize)
    support, query = support.reshape(support.size(0), -1), query.reshape(query.size(0), -1)
    prototypes = compute_prototypes(support, labels)
    if normalize:
        prototypes, query = normalize_rows(prototypes), normalize_rows(query)
    return -distance_fn(prototypes, query)


def _distance(distance: str | Distance, normalize: bool) -> tuple[Distance, bool]:
    """Returns the distance function named by ``distance`` (or ``distance`` itself) and whether to normalise."""
    if callable(distance):
        return distance, normalize
    if distance not in DISTANCES:
        raise ValueError(f"distance={distance!r} is not one of {sorted(DISTANCES)}; or pass a function (prototypes, queries) -> distances")
    return DISTANCES[distance], normalize or distance == "cosine"


class PrototypicalClassifier(nn.Module):
    """The differentiable nearest-prototype classifier of Prototypical Networks (learn2learn's API).

    ``fit_(support, labels)`` stores the class prototypes (as ``torch.unique(labels)`` orders
    the classes); ``classifier(query)`` returns ``-distance`` logits, shape ``(n_queries,
    n_classes)``. ``distance`` is ``"euclidean"`` (squared), ``"cosine"`` (normalises the
    embeddings) or a function ``(prototypes, queries) -> distances``. With ``support`` and
    ``labels`` given, ``fit_`` runs at construction.
    """

    def __init__(
        self,
        support: Tensor | None = None,
        labels: Tensor | None = None,
        distance: str | Distance = "euclidean",
        normalize: bool = False,
    ) -> None:
        super().__init__()
        self.distance, self.normalize = _distance(distance, normalize)
        self.prototypes: Tensor | None = None
        if support is not None and labels is not None:
            self.fit_(support, labels)

    def fit_(self, support: Tensor, labels: Tensor) -> Tensor:
        """Returns the prototypes of ``support`` (one per class) after storing them for ``forward``."""
        prototypes = compute_prototypes(support.reshape(support.size(0), -1), labels)
        if self.normalize:
            prototypes = normalize_rows(prototypes)
        self.prototypes = prototypes
        return prototypes

    # learn2learn calls PrototypicalClassifier.normalize(x) on the class; instances hold the flag.
    normalize = staticmethod(normalize_rows)

    @staticmethod
    def euclidean_distance(prototypes: Tensor, queries: Tensor) -> Tensor:
        """Returns squared Euclidean distances, shape ``(n_queries, n_classes)``."""
        return euclidean_distance(prototypes, queries)

    @staticmethod
    def cosine_distance(prototypes: Tensor, queries: Tensor) -> Tensor:
        """Returns ``-<q, p>``, shape ``(n_queries, n_classes)``."""
        return cosine_distance(prototypes, queries)

    def forward(self, x: Tensor) -> Tensor:
        """Returns the logits ``-distance(prototypes, x)`` of each row of ``x``.

        Raises:
            RuntimeError: if ``fit_`` has not been called.
        """
        if self.prototypes is None:
            raise RuntimeError("PrototypicalClassifier has no prototypes; call fit_(support, labels) first")
        x = x.reshape(x.size(0), -1)
        if self.normalize:
            x = normalize_rows(x)
        return -self.distance(self.prototypes, x)
