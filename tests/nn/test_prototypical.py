"""Prototypical Networks' head: prototypes are class means, logits are minus the (squared Euclidean or cosine) distance."""

from __future__ import annotations

import pytest
import torch

from metaloop.nn import PrototypicalClassifier, compute_prototypes, prototype_logits

F64 = torch.float64


def test_compute_prototypes_are_the_class_means_in_sorted_label_order():
    support = torch.tensor([[0.0, 0.0], [2.0, 2.0], [1.0, 0.0], [3.0, 4.0]], dtype=F64)
    labels = torch.tensor([7, 3, 7, 3])
    expected = torch.tensor([[2.5, 3.0], [0.5, 0.0]], dtype=F64)  # class 3, then class 7
    torch.testing.assert_close(compute_prototypes(support, labels), expected, rtol=0, atol=0)


def test_euclidean_logits_are_minus_squared_distances_and_differentiable():
    gen = torch.Generator().manual_seed(0)
    support = torch.randn(6, 3, generator=gen, dtype=F64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    query = torch.randn(4, 3, generator=gen, dtype=F64)
    means = support.detach().reshape(3, 2, 3).mean(1)
    expected = -((query[:, None, :] - means[None]) ** 2).sum(-1)
    torch.testing.assert_close(prototype_logits(support, labels, query), expected, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda s: prototype_logits(s, labels, query), (support,))


def test_cosine_logits_are_cosine_similarities():
    support = torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=F64)
    query = torch.tensor([[1.0, 1.0]], dtype=F64)
    logits = prototype_logits(support, torch.tensor([0, 1]), query, distance="cosine")
    torch.testing.assert_close(logits, torch.full((1, 2), 2**-0.5, dtype=F64), rtol=0, atol=1e-6)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("normalize", [False, True])
def test_classifier_recognises_its_support_examples(distance, normalize):
    gen = torch.Generator().manual_seed(1)
    support = torch.randn(5, 1, 8, 8, generator=gen).repeat_interleave(3, 0)
    labels = torch.arange(5).repeat_interleave(3)
    classifier = PrototypicalClassifier(support, labels, distance=distance, normalize=normalize)
    assert classifier.normalize == (normalize or distance == "cosine")
    assert (classifier(support).argmax(1) == labels).all()
    torch.testing.assert_close(classifier(support), prototype_logits(support, labels, support, distance, normalize))


def test_classifier_takes_a_distance_function_and_names_its_errors():
    support, labels = torch.eye(3), torch.arange(3)
    manhattan = lambda p, q: (q[:, None] - p[None]).abs().sum(-1)  # noqa: E731
    classifier = PrototypicalClassifier(distance=manhattan)
    classifier.fit_(support, labels)
    torch.testing.assert_close(classifier(support), -2 * (1 - torch.eye(3)), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"call fit_\(support, labels\) first"):
        PrototypicalClassifier()(support)
    with pytest.raises(ValueError, match=r"distance='manhattan' is not one of \['cosine', 'euclidean'\]"):
        PrototypicalClassifier(distance="manhattan")
    with pytest.raises(ValueError, match="give one label per row"):
        compute_prototypes(support, labels[:2])
    torch.testing.assert_close(PrototypicalClassifier.normalize(torch.tensor([[3.0, 4.0]])), torch.tensor([[0.6, 0.8]]))
