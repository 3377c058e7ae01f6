r"""MetaOptNet's differentiable SVM head (Lee et al. 2019): a multi-class SVM fitted on the support set, in plain torch.

The head solves the dual of the Crammer-Singer multi-class SVM used by MetaOptNet (and by
learn2learn's ``SVClassifier``): for ``n`` support embeddings with kernel ``K = S S^T`` and
one-hot labels ``Y`` (``n x w``),

.. math::

    \min_{\alpha \in \mathbb{R}^{n \times w}} \tfrac12 \operatorname{tr}(\alpha^\top (K + I) \alpha)
        - \langle Y, \alpha \rangle
    \quad \text{s.t.} \quad \alpha \le C\,Y, \quad \alpha \mathbf{1}_w = 0,

and scores a query ``q`` by ``logits_k = sum_i alpha_ik <s_i, q>``. The constraints split
by support row (``alpha_i = C (y_i - beta_i)`` with ``beta_i`` in the probability simplex),
so accelerated projected gradient (FISTA) finds the active set; the solution is then
recomputed exactly by one linear solve of the KKT system on that active set, which makes
``alpha`` an exact, differentiable function of ``K`` and ``C`` (the implicit-function-theorem
gradient that qpth's ``QPFunction`` gives). The active set is refined until the KKT
conditions hold; every operation is batched over leading dimensions.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from metaloop.nn.prototypical import normalize_rows

__all__ = ["project_simplex", "svm_dual", "svm_logits", "SVClassifier"]


def project_simplex(v: Tensor) -> Tensor:
    """Returns the Euclidean projection of each last-dimension row of ``v`` onto the probability simplex.

    Sort-based (Held et al. 1974; Duchi et al. 2008): ``max(v - tau, 0)`` with the threshold
    ``tau`` that makes each row sum to one.
    """
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(dim=-1) - 1
    k = torch.arange(1, v.size(-1) + 1, device=v.device, dtype=v.dtype)
    support = (u - css / k) > 0
    rho = support.to(v.dtype).cumsum(dim=-1).argmax(dim=-1, keepdim=True)  # last index where support holds
    tau = css.gather(-1, rho) / (rho + 1).to(v.dtype)
    return (v - tau).clamp_min(0)


def _project(v: Tensor, bound: Tensor, C: float | Tensor) -> Tensor:
    """Returns the projection of ``v`` onto ``{alpha: alpha <= bound, rows of alpha sum to 0}`` (``bound = C Y``)."""
    return bound - C * project_simplex((bound - v) / C)


def _kkt_solve(gram: Tensor, onehot: Tensor, bound: Tensor, active: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(alpha, nu, mu)``: the equality-constrained optimum with ``active`` entries held at ``bound``.

    Solves, for each leading index, ``(G alpha)_ik + nu_i = Y_ik`` on free entries (``G = K + I``),
    ``alpha_ik = bound_ik`` on active ones and ``sum_k alpha_ik = 0``. ``mu`` are the multipliers
    of the upper bounds (``Y - G alpha - nu``, zero where free).

    Class columns decouple given ``nu``: column ``k``'s free entries solve
    ``G_FF alpha_Fk = Y_Fk - nu_F - G_FA bound_Ak`` (``M_k``, which is ``G_FF`` on the free block and
    the identity elsewhere, keeps the shapes fixed), and the row sums give an ``n x n`` system for
    ``nu`` (a sum of positive-definite blocks, since every row has a free entry). That is ``w``
    solves of size ``n`` instead of one of size ``n w``.
    """
    free = (~active).transpose(-1, -2).to(gram.dtype)  # (..., w, n)
    held = 1 - free
    g = gram.unsqueeze(-3)  # (..., 1, n, n), shared by the w columns
    m = free.unsqueeze(-1) * g * free.unsqueeze(-2) + torch.diag_embed(held)
    fixed = bound.transpose(-1, -2) * held  # (..., w, n): the held entries' values, zero elsewhere
    c = onehot.transpose(-1, -2) - (g @ fixed.unsqueeze(-1)).squeeze(-1)
    solved = torch.linalg.solve(m, torch.cat([(free * c).unsqueeze(-1), torch.diag_embed(free)], dim=-1))
    z, coupling = solved[..., 0], solved[..., 1:]  # M_k^-1 (f_k * c_k) and M_k^-1 diag(f_k)
    nu = torch.linalg.solve(coupling.sum(-3), (z.sum(-2) + fixed.sum(-2)).unsqueeze(-1)).squeeze(-1)
    alpha = (z - (coupling @ nu.unsqueeze(-2).unsqueeze(-1)).squeeze(-1) + fixed).transpose(-1, -2)
    mu = onehot - gram @ alpha - nu.unsqueeze(-1)
    return alpha, nu, mu


def svm_dual(
    kernel: Tensor,
    onehot: Tensor,
    C_reg: float | Tensor = 0.1,
    max_iters: int = 15,
    warm_iters: int = 20,
) -> Tensor:
    """Returns the SVM dual solution ``alpha`` (shape of ``onehot``, ``(..., n, w)``), differentiable in ``kernel`` and ``C_reg``.

    ``kernel`` is ``(..., n, n)`` (``S S^T``), ``onehot`` the support labels one-hot. FISTA
    runs up to ``warm_iters`` steps without a graph (fewer once it stops moving); then up to
    ``max_iters`` KKT solves refine the active set (a warning says when the KKT conditions
    still fail, with the violation).

    Raises:
        ValueError: if the shapes disagree or ``C_reg`` is not positive.
    """
    n, w = onehot.shape[-2:]
    if kernel.shape[-2:] != (n, n):
        raise ValueError(f"kernel has shape {tuple(kernel.shape)} but onehot has {n} rows; the kernel must be (..., {n}, {n})")
    c_value = float(C_reg.detach()) if isinstance(C_reg, Tensor) else float(C_reg)
    if c_value <= 0:
        raise ValueError(f"C_reg={c_value} must be positive (MetaOptNet uses 0.1)")
    if max_iters < 1:
        raise ValueError(f"max_iters={max_iters} must be at least 1")
    onehot = onehot.to(kernel.dtype)
    gram = kernel + torch.eye(n, dtype=kernel.dtype, device=kernel.device)
    tol = 1e-10 if kernel.dtype == torch.float64 else 1e-5
    with torch.no_grad():
        g, c, y = gram.detach(), C_reg.detach() if isinstance(C_reg, Tensor) else C_reg, onehot
        bound = c * y
        step = 1.0 / torch.linalg.eigvalsh(g)[..., -1:].unsqueeze(-1)  # 1 / L, L = largest eigenvalue of K + I
        alpha = torch.zeros_like(y)
        z, t = alpha, 1.0
        scale = max(c_value, 1.0)
        # rounding in the KKT residuals grows with the kernel's magnitude
        slack = tol * scale * max(1.0, float(g.abs().max()))
        for i in range(warm_iters):
            new = _project(z - step * (g @ z - y), bound, c)
            t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
            z = new + ((t - 1) / t_next) * (new - alpha)
            moved = (new - alpha).abs().max() if i % 10 == 9 else None
            alpha, t = new, t_next
            if moved is not None and moved < 1e-6 * scale:
                break  # close enough to tell which entries sit at their bound
        active = alpha >= bound - 1e-3 * scale
        for _ in range(max_iters):
            alpha, _, mu = _kkt_solve(g, y, bound, active)
            too_high = ~active & (alpha > bound + slack)
            wrong_sign = active & (mu < -slack)
            if not (too_high.any() or wrong_sign.any()):
                break
            active = (active & ~wrong_sign) | too_high
        else:
            violation = max(float((alpha - bound).clamp_min(0).max()), float((-mu * active).clamp_min(0).max()))
            warnings.warn(
                f"svm_dual: the KKT conditions still fail by {violation:.3g} after max_iters={max_iters} active-set "
                "refinements; raise max_iters or warm_iters",
                RuntimeWarning,
                stacklevel=2,
            )
    alpha, _, _ = _kkt_solve(gram, onehot, C_reg * onehot, active)
    return alpha


def svm_logits(
    support: Tensor,
    labels: Tensor,
    query: Tensor,
    ways: int | None = None,
    C_reg: float | Tensor = 0.1,
    max_iters: int = 15,
    normalize: bool = False,
) -> Tensor:
    """Returns MetaOptNet's SVM logits of each query row, shape ``(n_queries, ways)``.

    ``labels`` are class indices ``0..ways-1`` (``ways`` defaults to the number of distinct
    labels); embeddings are flattened to rows and, with ``normalize``, scaled to unit norm.
    """
    alpha, support = _fit(support, labels, ways, C_reg, max_iters, normalize)
    query = query.reshape(query.size(0), -1)
    if normalize:
        query = normalize_rows(query)
    return (query @ support.t()) @ alpha


def _fit(
    support: Tensor,
    labels: Tensor,
    ways: int | None,
    C_reg: float | Tensor,
    max_iters: int,
    normalize: bool,
) -> tuple[Tensor, Tensor]:
    """Returns ``(alpha, support rows)`` of the SVM fitted on ``support``."""
    support = support.reshape(support.size(0), -1)
    if labels.dim() != 1 or labels.numel() != support.size(0):
        raise ValueError(f"labels has shape {tuple(labels.shape)} but support has {support.size(0)} rows; give one label per row")
    if ways is None:
        ways = int(torch.unique(labels).numel())
    if labels.min() < 0 or labels.max() >= ways:
        raise ValueError(
            f"labels range over [{int(labels.min())}, {int(labels.max())}] but ways={ways}; "
            f"labels must be class indices 0..{ways - 1}"
        )
    if normalize:
        support = normalize_rows(support)
    onehot = torch.nn.functional.one_hot(labels.long(), ways).to(support.dtype)
    return svm_dual(support @ support.t(), onehot, C_reg, max_iters), support


class SVClassifier(nn.Module):
    """MetaOptNet's differentiable SVM classifier (learn2learn's API): ``fit_(support, labels)``, then ``classifier(query)``.

    ``fit_`` solves the SVM dual exactly (see :func:`svm_dual`) and keeps ``qp_solution``
    (``(n_support, ways)``) on the graph, so a query loss trains the embedding network
    through the solver. ``C_reg`` is the SVM's regularisation, ``max_iters`` bounds the
    active-set refinements; ``normalize`` scales embeddings to unit norm. With ``support``
    and ``labels`` given, ``fit_`` runs at construction.
    """

    def __init__(
        self,
        support: Tensor | None = None,
        labels: Tensor | None = None,
        ways: int | None = None,
        normalize: bool = False,
        C_reg: float = 0.1,
        max_iters: int = 15,
    ) -> None:
        super().__init__()
        self.C_reg = C_reg
        self.max_iters = max_iters
        self._normalize = normalize
        self.qp_solution: Tensor | None = None
        self.support: Tensor | None = None
        if support is not None and labels is not None:
            self.fit_(support, labels, ways)

    normalize = staticmethod(normalize_rows)

    def fit_(
        self,
        support: Tensor,
        labels: Tensor,
        ways: int | None = None,
        C_reg: float | None = None,
        max_iters: int | None = None,
    ) -> Tensor:
        """Returns the dual solution ``alpha`` after storing it and the support rows for ``forward``."""
        alpha, rows = _fit(
            support,
            labels,
            ways,
            self.C_reg if C_reg is None else C_reg,
            self.max_iters if max_iters is None else max_iters,
            self._normalize,
        )
        self.qp_solution, self.support = alpha, rows
        self.num_support, self.ways = alpha.shape
        return alpha

    def forward(self, x: Tensor) -> Tensor:
        """Returns the logits ``sum_i alpha_ik <s_i, x>`` of each row of ``x``, shape ``(n, ways)``.

        Raises:
            RuntimeError: if ``fit_`` has not been called.
        """
        if self.qp_solution is None or self.support is None:
            raise RuntimeError("SVClassifier is not fitted; call fit_(support, labels) first")
        x = x.reshape(x.size(0), -1)
        if self._normalize:
            x = normalize_rows(x)
        return (x @ self.support.t()) @ self.qp_solution
