"""Objectives: losses, metrics, output sizes and the checks that name a mismatched model or task."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metaloop.lightning import Classification, Regression


def test_classification_loss_metrics_and_ways():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, -1.0]])
    labels = torch.tensor([0, 1, 2])
    objective = Classification()
    torch.testing.assert_close(objective.loss(logits, labels), F.cross_entropy(logits, labels))
    metrics = objective.metrics(logits, labels)
    assert set(metrics) == set(objective.metric_names) and float(metrics["acc"]) == pytest.approx(2 / 3)
    assert objective.output_size(labels) == 3
    objective.check(logits, labels)


@pytest.mark.parametrize("output,target,message", [
    (torch.zeros(3, 2), torch.tensor([0, 1, 2]), r"returns shape \(3, 2\) for 3 examples of a 3-way task"),
    (torch.zeros(3, 3), torch.zeros(3), r"labels are floats .* use a regression objective"),
])
def test_classification_check_names_the_mismatch(output, target, message):
    with pytest.raises(ValueError, match=message):
        Classification().check(output, target)


def test_regression_loss_metrics_and_checks():
    output, target = torch.tensor([[1.0], [2.0]]), torch.tensor([[0.0], [4.0]])
    objective = Regression()
    assert float(objective.loss(output, target)) == pytest.approx(2.5)
    assert set(objective.metrics(output, target)) == set(objective.metric_names) == {"loss"}
    assert objective.output_size(target) is None
    objective.check(output, target)
    with pytest.raises(ValueError, match=r"returns shape \(2,\) for targets of shape \(2, 1\)"):
        objective.check(output.flatten(), target)
    with pytest.raises(ValueError, match="targets are integers .* use a classification objective"):
        objective.check(output, target.long())
