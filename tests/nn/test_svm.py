"""MetaOptNet's SVM head: the dual solution equals a brute-force active-set enumeration, satisfies the KKT
conditions, and its gradients pass gradcheck (float64)."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from metaloop.nn import SVClassifier, project_simplex, svm_dual, svm_logits

F64 = torch.float64


def brute_force_dual(kernel: torch.Tensor, onehot: torch.Tensor, C: float) -> torch.Tensor:
    """The QP's minimiser found without our solver: the best feasible minimiser over every face of the box.

    For each set S of entries held at their bound ``C y``, minimise ``1/2 a^T Q a - y^T a`` subject to
    ``a_S = C y_S`` and zero row sums (a least-squares KKT solve with the explicit ``Q = (K + I) kron I``);
    the optimum is the feasible candidate of least objective.
    """
    n, w = onehot.shape
    q = torch.kron(kernel + torch.eye(n, dtype=F64), torch.eye(w, dtype=F64))
    y, bound = onehot.flatten(), (C * onehot).flatten()
    rows = torch.kron(torch.eye(n, dtype=F64), torch.ones(1, w, dtype=F64))
    best, best_value = None, float("inf")
    for held in itertools.product([False, True], repeat=n * w):
        held_t = torch.tensor(held)
        eq = torch.cat([rows, torch.eye(n * w, dtype=F64)[held_t]])
        rhs_eq = torch.cat([torch.zeros(n, dtype=F64), bound[held_t]])
        m = eq.shape[0]
        kkt = torch.cat([torch.cat([q, eq.t()], 1), torch.cat([eq, torch.zeros(m, m, dtype=F64)], 1)])
        sol = torch.linalg.lstsq(kkt, torch.cat([y, rhs_eq]).unsqueeze(1)).solution.squeeze(1)[: n * w]
        if (eq @ sol - rhs_eq).abs().max() > 1e-9 or (sol > bound + 1e-9).any():
            continue
        value = float(0.5 * sol @ q @ sol - y @ sol)
        if value < best_value - 1e-12:
            best, best_value = sol, value
    return best.reshape(n, w)


def random_task(seed: int, n_ways: int, shots: int, dim: int, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    support = scale * torch.randn(n_ways * shots, dim, generator=gen, dtype=F64)
    labels = torch.arange(n_ways).repeat_interleave(shots)
    return support, labels


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("C", [0.1, 1.0])
@pytest.mark.parametrize("n_ways,shots", [(3, 1), (2, 2)])
def test_svm_dual_equals_the_brute_force_minimiser(seed, C, n_ways, shots):
    support, labels = random_task(seed, n_ways=n_ways, shots=shots, dim=4, scale=1.5)
    onehot = torch.nn.functional.one_hot(labels, n_ways).to(F64)
    kernel = support @ support.t()
    torch.testing.assert_close(svm_dual(kernel, onehot, C), brute_force_dual(kernel, onehot, C), rtol=0, atol=1e-9)


@pytest.mark.parametrize("n_ways,shots,dim,C,scale,n_active", [
    (5, 1, 64, 0.1, 0.5, 0),
    (5, 5, 64, 0.1, 0.5, 25),
    (20, 1, 64, 0.1, 0.5, 167),
    (5, 5, 64, 1.0, 0.1, 1),
    (5, 5, 1600, 1.0, 0.5, 0),
])
def test_svm_dual_satisfies_the_kkt_conditions(n_ways, shots, dim, C, scale, n_active):
    """Feasible, zero row sums, and stationary with non-negative multipliers on the bound constraints (1e-8);
    the cases cover no, one, some and most entries at their bound (n_active)."""
    support, labels = random_task(0, n_ways, shots, dim, scale=scale)
    onehot = torch.nn.functional.one_hot(labels, n_ways).to(F64)
    gram = support @ support.t() + torch.eye(len(labels), dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        alpha = svm_dual(support @ support.t(), onehot, C)
    bound = C * onehot
    assert (alpha <= bound + 1e-8).all()
    torch.testing.assert_close(alpha.sum(1), torch.zeros(len(labels), dtype=F64), rtol=0, atol=1e-8)
    residual = onehot - gram @ alpha  # = nu_i + mu_ik, with mu_ik = 0 where alpha_ik < bound
    free = alpha < bound - 1e-8
    nu = torch.stack([residual[i][free[i]].mean() for i in range(len(labels))])
    mu = residual - nu[:, None]
    assert mu[free].abs().max() < 1e-8
    assert int((~free).sum()) == n_active
    assert (mu[~free] > -1e-8).all()


def test_svm_dual_is_batched_over_leading_dimensions():
    tasks = [random_task(s, 4, 2, 8) for s in range(3)]
    onehot = torch.stack([torch.nn.functional.one_hot(l, 4).to(F64) for _, l in tasks])
    kernel = torch.stack([s @ s.t() for s, _ in tasks])
    batched = svm_dual(kernel, onehot, 0.1)
    for i in range(3):
        torch.testing.assert_close(batched[i], svm_dual(kernel[i], onehot[i], 0.1), rtol=0, atol=1e-12)


def test_svm_logits_pass_gradcheck_in_support_query_and_C():
    support, labels = random_task(3, n_ways=3, shots=2, dim=5)
    query = torch.randn(4, 5, dtype=F64, generator=torch.Generator().manual_seed(9))
    C = torch.tensor(0.1, dtype=F64, requires_grad=True)
    inputs = (support.requires_grad_(), query.requires_grad_(), C)
    assert torch.autograd.gradcheck(lambda s, q, c: svm_logits(s, labels, q, C_reg=c), inputs, eps=1e-6, atol=1e-7)


def test_sv_classifier_fits_and_scores_and_trains_its_inputs():
    support, labels = random_task(4, n_ways=5, shots=3, dim=16, scale=0.1)
    support = (support + torch.eye(16, dtype=F64)[labels]).requires_grad_()  # class c near the unit vector e_c
    head = SVClassifier(C_reg=0.1)
    alpha = head.fit_(support, labels)
    assert alpha.shape == (15, 5) and head.ways == 5 and head.num_support == 15
    logits = head(support)
    assert (logits.argmax(1) == labels).all()
    torch.nn.functional.cross_entropy(logits, labels).backward()
    assert support.grad is not None and support.grad.abs().max() > 0
    torch.testing.assert_close(logits, svm_logits(support, labels, support, C_reg=0.1), rtol=0, atol=1e-6)


def test_sv_classifier_normalize_scales_rows_and_constructor_fits():
    support, labels = random_task(5, n_ways=3, shots=2, dim=6, scale=10.0)
    head = SVClassifier(support, labels, normalize=True)
    torch.testing.assert_close(head.support.norm(dim=1), torch.ones(6, dtype=F64), rtol=0, atol=1e-6)
    torch.testing.assert_close(head(support * 3), head(support), rtol=0, atol=1e-6)


def test_sv_classifier_errors_name_the_fix():
    support, labels = random_task(0, 3, 1, 4)
    with pytest.raises(RuntimeError, match=r"call fit_\(support, labels\) first"):
        SVClassifier()(support)
    with pytest.raises(ValueError, match=r"labels range over \[0, 2\] but ways=2"):
        SVClassifier().fit_(support, labels, ways=2)
    with pytest.raises(ValueError, match="give one label per row"):
        SVClassifier().fit_(support, labels[:2])
    with pytest.raises(ValueError, match=r"C_reg=-1.0 must be positive"):
        SVClassifier(C_reg=-1.0).fit_(support, labels)


def test_project_simplex_returns_the_nearest_point_of_the_simplex():
    v = torch.tensor([[0.2, 0.3, 0.5], [2.0, 0.0, -1.0], [0.5, 0.5, 0.5], [-1.0, -2.0, -3.0]], dtype=F64)
    expected = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(project_simplex(v), expected, rtol=0, atol=1e-12)
