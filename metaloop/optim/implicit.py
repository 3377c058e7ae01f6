"""Implicit meta-gradients: differentiate an inner problem's solution by the implicit function theorem.

If the inner solution ``phi*`` of meta-parameters ``theta`` is a root of an optimality
function, ``F(phi*, theta) = 0``, then ``d phi*/d theta = -(dF/dphi)^-1 dF/dtheta`` however
``phi*`` was found. So the backward pass needs no graph of the solver: it solves one linear
system ``(dF/dphi)^T u = w`` for the incoming gradient ``w`` (by conjugate gradient or a
Neumann series, with Hessian-vector products) and returns ``-u^T dF/dtheta``. Memory is flat
in the number of inner steps.

- :func:`implicit_solution` attaches that backward to a solution already computed;
  :func:`custom_root` (in the manner of jaxopt's and torchopt's ``custom_root``) wraps a user's
  own inner solver with it.
- :func:`implicit_inner_loop` is iMAML (Rajeswaran et al. 2019, "Meta-Learning with Implicit
  Gradients"): :func:`~metaloop.optim.loop.inner_loop`, with any rule of the optimizer table,
  on the proximal objective ``L(phi) + lam/2 ||phi - theta||^2``, whose optimality function
  ``grad L(phi)/lam + phi - theta`` gives the meta-gradient ``(I + H/lam)^-1 grad L_query(phi*)``.
- :func:`conjugate_gradient` and :func:`neumann` are the linear solvers, pure functions of a
  matrix-vector product and a right-hand side (lists of tensors).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal, Mapping, Union

import torch
from torch import Tensor

from metaloop.optim.loop import WeightsLoss, inner_loop
from metaloop.optim.rules import HParams, Rule
from metaloop.typed import AtLeast, Hint, check_fields

__all__ = [
    "ImplicitOptions",
    "conjugate_gradient",
    "neumann",
    "SOLVERS",
    "implicit_solution",
    "custom_root",
    "implicit_inner_loop",
]

Vector = list[Tensor]
MatVec = Callable[[Vector], Vector]
LinearSolver = Callable[..., Vector]  # solve(matvec, b, *, maxiter, tol) -> x with matvec(x) ~= b
OptimalityFn = Callable[..., Mapping[str, Tensor]]  # optimality_fn(solution, meta, *args) -> residual by name
Solve = Union[Literal["cg", "neumann"], LinearSolver]


# -- linear solvers -----------------------------------------------------------------------
def _dot(a: Vector, b: Vector) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))  # type: ignore[return-value]


def _converged(done: Tensor) -> bool:
    """Returns whether every entry of ``done`` holds; False under vmap, where Python cannot branch on values.

    Under :func:`torch.func.vmap` the solvers run all ``maxiter`` iterations and freeze converged
    entries with :func:`torch.where` instead of stopping early: the result is the same.
    """
    return not torch._C._functorch.is_batchedtensor(done) and bool(done.all())


def conjugate_gradient(matvec: MatVec, b: Vector, *, maxiter: int = 10, tol: float = 1e-10) -> Vector:
    """Returns ``x`` with ``A x ~= b`` by conjugate gradient, for a symmetric positive definite ``A = matvec``.

    Stops after ``maxiter`` products with ``A`` or once the residual norm is at most ``tol``
    times the norm of ``b`` (Hestenes and Stiefel 1952; Nocedal and Wright, algorithm 5.2). On
    an ``n``-dimensional system it is exact (up to rounding) after ``n`` iterations. Where ``A``
    is not positive definite (iMAML's ``I + H/lam`` when the Hessian has eigenvalues below
    ``-lam``) it stops at the first direction of non-positive curvature and returns the iterate
    so far, as truncated-Newton CG does (Nocedal and Wright, algorithm 7.1), rather than diverge.
    """
    x = [torch.zeros_like(v) for v in b]
    r, p = list(b), list(b)
    rs = _dot(r, r)
    stop = tol**2 * rs
    running = rs > stop
    for _ in range(maxiter):
        if _converged(~running):
            break
        ap = matvec(p)
        curvature = _dot(p, ap)
        running = running & (curvature > 0)
        alpha = torch.where(running, rs / torch.where(running, curvature, 1.0), 0.0)
        x = [xi + alpha * pi for xi, pi in zip(x, p)]
        r = [ri - alpha * api for ri, api in zip(r, ap)]
        rs_new = _dot(r, r)
        beta = torch.where(running, rs_new / torch.where(running, rs, 1.0), 0.0)
        p = [ri + beta * pi for ri, pi in zip(r, p)]
        rs = rs_new
        running = running & (rs > stop)
    return x


def neumann(matvec: MatVec, b: Vector, *, maxiter: int = 10, tol: float = 1e-10, alpha: float = 1.0) -> Vector:
    """Returns ``x = alpha sum_{i=0}^{maxiter} (I - alpha A)^i b``, the truncated Neumann series of ``A^-1 b``.

    Converges when the spectral radius of ``I - alpha A`` is below 1 (Lorraine et al. 2020,
    "Optimizing Millions of Hyperparameters by Implicit Differentiation"); for iMAML's
    ``A = I + H/lam`` with ``alpha = 1`` that is ``||H|| < lam``. Stops early once a term's norm is
    at most ``tol`` times the norm of ``alpha b``.
    """
    term = [alpha * v for v in b]
    x = list(term)
    stop = tol**2 * _dot(term, term)
    for _ in range(maxiter):
        active = _dot(term, term) > stop
        if _converged(~active):
            break
        term = [torch.where(active, t - alpha * at, 0.0) for t, at in zip(term, matvec(term))]
        x = [xi + t for xi, t in zip(x, term)]
    return x


SOLVERS: dict[str, LinearSolver] = {"cg": conjugate_gradient, "neumann": neumann}


# -- options ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImplicitOptions:
    """How iMAML solves its inner problem's linear system (see :func:`implicit_inner_loop`).

    Args:
        lam: the proximal regulariser's strength ``lambda`` (> 0): larger keeps the adapted
            weights closer to the initial ones and the system ``I + H/lam`` better conditioned.
            Conjugate gradient needs ``I + H/lam`` positive definite, i.e. ``lam`` above minus the
            support loss Hessian's lowest eigenvalue (nonconvex models have negative ones);
            below that it stops at the first negative curvature and the meta-gradient is rough.
        solver: ``"cg"`` (conjugate gradient), ``"neumann"`` (Neumann series), or a callable
            ``solve(matvec, b, *, maxiter, tol) -> x``.
        maxiter: the most Hessian-vector products per meta-gradient.
        tol: stop once the residual is at most ``tol`` times the right-hand side (relative).

    Raises:
        ValueError: for ``lam <= 0``, an unknown solver, ``maxiter < 1`` or ``tol < 0``.
    """

    lam: Annotated[float, AtLeast(1e-12), Hint("the proximal regulariser's weight, > 0")] = 1.0
    solver: Solve = "cg"
    maxiter: Annotated[int, AtLeast(1), Hint("the most Hessian-vector products per task and meta-step")] = 10
    tol: Annotated[float, AtLeast(0), Hint("the solver's relative residual tolerance")] = 1e-10

    def __post_init__(self) -> None:
        check_fields(self)
        _linear_solver(self.solver, self.maxiter, self.tol)


def _linear_solver(solve: Solve, maxiter: int, tol: float) -> Callable[[MatVec, Vector], Vector]:
    """Returns ``solve`` (a name of :data:`SOLVERS` or a callable) with ``maxiter`` and ``tol`` bound, after checking them."""
    if isinstance(solve, str):
        if solve not in SOLVERS:
            raise ValueError(
                f"solver={solve!r} is not one of {sorted(SOLVERS)}; pick one, or pass a callable solve(matvec, b, *, maxiter, tol)"
            )
        solve = SOLVERS[solve]
    elif not callable(solve):
        raise ValueError(f"solver={solve!r} is neither one of {sorted(SOLVERS)} nor a callable solve(matvec, b, *, maxiter, tol)")
    if isinstance(maxiter, bool) or not isinstance(maxiter, int) or maxiter < 1:
        raise ValueError(f"maxiter={maxiter!r} must be an int >= 1 (the most matrix-vector products of the solver)")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or tol < 0:
        raise ValueError(f"tol={tol!r} must be a number >= 0 (the solver's relative residual tolerance)")
    return functools.partial(solve, maxiter=maxiter, tol=tol)


# -- the implicit function theorem ----------------------------------------------------------
@dataclass(frozen=True)
class _Root:
    """What the backward pass needs besides tensors: the optimality function, its extra arguments, the names, the solver."""

    optimality_fn: OptimalityFn
    args: tuple[Any, ...]
    solution_names: tuple[str, ...]
    meta_names: tuple[str, ...]
    solve: Callable[[MatVec, Vector], Vector]

    def residual(self, solution: tuple[Tensor, ...], meta: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        residual = self.optimality_fn(
            dict(zip(self.solution_names, solution)), dict(zip(self.meta_names, meta)), *self.args
        )
        if set(residual) != set(self.solution_names):
            raise ValueError(
                f"optimality_fn returned residuals for {sorted(residual)}; it must return one per solution tensor "
                f"{sorted(self.solution_names)}"
            )
        return tuple(residual[n] for n in self.solution_names)


class _ImplicitSolution(torch.autograd.Function):
    """Identity on the solution; backward by the implicit function theorem (to the meta tensors)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(root: _Root, n: int, *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        return tuple(t.clone() for t in tensors[:n])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.root, ctx.n = inputs[0], inputs[1]
        ctx.save_for_backward(*inputs[2:])

    @staticmethod
    def backward(ctx: Any, *grad_solution: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        root, n = ctx.root, ctx.n
        solution, meta = tuple(ctx.saved_tensors[:n]), tuple(ctx.saved_tensors[n:])
        # (dF/dphi)^T u = w, then the gradient of meta is -u^T dF/dmeta
        _, vjp_solution = torch.func.vjp(lambda *s: root.residual(s, meta), *solution)
        u = root.solve(lambda v: list(vjp_solution(tuple(v))), list(grad_solution))
        _, vjp_meta = torch.func.vjp(lambda *m: root.residual(solution, m), *meta)
        grad_meta = vjp_meta(tuple(u))
        return (None, None, *([None] * n), *(-g for g in grad_meta))


def implicit_solution(
    optimality_fn: OptimalityFn,
    solution: Mapping[str, Tensor],
    meta: Mapping[str, Tensor],
    *args: Any,
    solve: Solve = "cg",
    maxiter: int = 10,
    tol: float = 1e-10,
) -> dict[str, Tensor]:
    """Returns ``solution``'s values, differentiable in ``meta`` by the implicit function theorem.

    Args:
        optimality_fn: ``optimality_fn(solution, meta, *args) -> residual``, dicts of tensors by
            name, with one residual per solution tensor, zero at the solution (e.g. the gradient
            of the inner objective). It must be differentiable with :func:`torch.func.vjp`.
        solution: the inner problem's (approximate) root; its graph, if any, is not used.
        meta: the tensors to differentiate; tensors that ``optimality_fn`` reads from elsewhere
            (closures, ``args``) get no gradient through the solution.
        solve: the linear solver, ``"cg"`` or ``"neumann"`` (see :class:`ImplicitOptions`). Conjugate
            gradient assumes ``dF/dsolution`` is symmetric positive definite (``F`` a gradient of a convex
            objective); the Neumann series that its spectral radius about ``I`` is below 1.
        maxiter: the solver's most iterations (see :class:`ImplicitOptions`).
        tol: the solver's relative residual tolerance (see :class:`ImplicitOptions`).

    The backward pass solves ``(dF/dsolution)^T u = w`` for the incoming gradient ``w`` and gives
    ``meta`` the gradient ``-u^T dF/dmeta``; it is not itself differentiable (no third order).
    Works under :func:`torch.func.vmap`.

    Raises:
        ValueError: for an unknown solver, ``maxiter < 1`` or ``tol < 0``, or (in backward) an
            ``optimality_fn`` whose residuals do not name the solution tensors.
    """
    root = _Root(optimality_fn, args, tuple(solution), tuple(meta), _linear_solver(solve, maxiter, tol))
    tensors = [t.detach() for t in solution.values()] + list(meta.values())
    return dict(zip(solution, _ImplicitSolution.apply(root, len(solution), *tensors)))


def custom_root(
    optimality_fn: OptimalityFn, *, solve: Solve = "cg", maxiter: int = 10, tol: float = 1e-10
) -> Callable[[Callable[..., Mapping[str, Tensor]]], Callable[..., dict[str, Tensor]]]:
    """Returns a decorator making ``solver(meta, *args) -> solution`` differentiable in ``meta`` implicitly.

    The decorated solver is called on detached ``meta`` (so whatever it does, e.g. many steps of
    an optimizer, keeps no graph), and its solution gets the gradient of :func:`implicit_solution`
    with ``optimality_fn(solution, meta, *args)``. As jaxopt's and torchopt's ``custom_root``::

        @custom_root(lambda w, m, x, y: {"w": grad_of_inner_loss(w, m, x, y)["w"]}, solve="cg", maxiter=20)
        def ridge(meta, x, y): ...

    Raises:
        ValueError: for an unknown solver, ``maxiter < 1`` or ``tol < 0`` (when decorating).
    """
    _linear_solver(solve, maxiter, tol)

    def decorate(solver: Callable[..., Mapping[str, Tensor]]) -> Callable[..., dict[str, Tensor]]:
        @functools.wraps(solver)
        def solved(meta: Mapping[str, Tensor], *args: Any) -> dict[str, Tensor]:
            solution = solver({n: t.detach() for n, t in meta.items()}, *args)
            return implicit_solution(optimality_fn, solution, meta, *args, solve=solve, maxiter=maxiter, tol=tol)

        return solved

    return decorate


# -- iMAML --------------------------------------------------------------------------------
def implicit_inner_loop(
    loss: WeightsLoss,
    weights: Mapping[str, Tensor],
    *,
    rule: Rule,
    hparams: Mapping[str, HParams],
    steps: int,
    options: ImplicitOptions = ImplicitOptions(),
    create_graph: bool = True,
    batched: bool = False,
) -> dict[str, Tensor]:
    """Returns ``weights`` adapted by iMAML: ``steps`` of ``rule`` on ``loss(phi) + lam/2 ||phi - weights||^2``.

    The inner loop (:func:`~metaloop.optim.loop.inner_loop`, any rule of the optimizer table)
    keeps no graph, so memory is flat in ``steps``. With ``create_graph`` the result's gradient
    to ``weights`` is the implicit one, ``(I + H/lam)^-1 g`` for an incoming gradient ``g`` with
    ``H`` the Hessian of ``loss`` at the result, solved by ``options.solver`` (Rajeswaran et al.
    2019, section 3): exact when the inner loop reaches the proximal problem's minimum, as the
    IFT assumes. Learned hyperparameters and tensors that ``loss`` captures get no gradient
    through the result. Weights that do not require grad stay frozen.

    ``loss``, ``weights``, ``rule``, ``hparams``, ``steps`` and ``batched`` are as for
    :func:`~metaloop.optim.loop.inner_loop`.

    Args:
        options: ``lam``, ``solver``, ``maxiter``, ``tol`` (see :class:`ImplicitOptions`).
        create_graph: False adapts the same way and returns detached weights (evaluation).

    Raises:
        ValueError: as :func:`~metaloop.optim.loop.inner_loop`.
    """
    lam = options.lam
    trainable = [n for n, w in weights.items() if w.requires_grad]
    anchor = {n: w.detach() for n, w in weights.items()}

    def proximal(phi: dict[str, Tensor]) -> Tensor:
        return loss(phi) + lam / 2 * sum(((phi[n] - anchor[n]) ** 2).sum() for n in trainable)

    # no graph is kept: each step's result is detached (the first step's small graph to weights is freed)
    phi = inner_loop(proximal, weights, rule=rule, hparams=hparams, steps=steps, create_graph=False, batched=batched)
    if not create_graph or not trainable:
        return phi
    frozen = {n: w for n, w in phi.items() if n not in trainable}

    def optimality(solution: dict[str, Tensor], meta: dict[str, Tensor]) -> dict[str, Tensor]:
        grads = torch.func.grad(lambda s: loss({**frozen, **s}))(solution)
        return {n: grads[n] / lam + solution[n] - meta[n] for n in solution}

    solved = implicit_solution(
        optimality,
        {n: phi[n] for n in trainable},
        {n: weights[n] for n in trainable},
        solve=options.solver,
        maxiter=options.maxiter,
        tol=options.tol,
    )
    return {**frozen, **solved}
