"""Pure update rules: one function per ``torch.optim`` algorithm, over a single tensor.

Each rule is a pair, as in optax: ``init(param, hparams) -> state`` and
``update(param, grad, state, hparams) -> (new_param, new_state)``. ``hparams`` maps
hyperparameter names (those of the ``torch.optim`` constructor) to values that may be Python
numbers or tensors that require grad; a rule treats both alike, so gradients flow into learned
hyperparameters. Rules never mutate their inputs and never read ``.data``, so they are
differentiable to any order and run under :func:`torch.func.vmap`. ``state["step"]`` is a
Python int: no host synchronisation in the inner loop.

The arithmetic follows PyTorch's single-tensor implementations (``torch/optim/*.py``) step
for step, so trajectories match ``torch.optim`` to rounding. Where PyTorch takes a square
root of a quantity that can be exactly zero (a moment estimate of an all-zero gradient),
:func:`safe_sqrt` is used: same value, and a zero (rather than infinite, hence NaN)
derivative at zero, so second-order gradients from a zero state are finite.

:func:`apply_rule` is the one step every inner loop takes, and :data:`OPTIMIZERS` the one
table from ``torch.optim`` type to rule.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence, Union

import torch
from torch import Tensor

__all__ = ["Rule", "OPTIMIZERS", "TRANSFORM", "apply_rule", "safe_sqrt", "transform_step", "apply_transform"]

Scalar = Union[float, int, Tensor]
State = dict[str, Any]
HParams = Mapping[str, Any]


class Rule(NamedTuple):
    """An update rule: ``init(param, hparams) -> state`` and ``update(param, grad, state, hparams) -> (param, state)``.

    Built with named fields (``Rule(init=..., update=...)``).

    Attributes:
        scalar_state: the state entries that are scalars (kept as Python numbers when imported
            from a live optimizer; ``"step"`` becomes an int).
        foreach: the same rule over a list of tensors sharing ``hparams``, with
            ``torch._foreach_*`` kernels; :func:`apply_rule` uses it when no hyperparameter is
            learned (a tensor). It shares the per-tensor form's gradient preparation.
        options: names of options the rule reads beyond the ``torch.optim`` constructor's
            arguments (Rprop's ``smooth_sign``); the shells accept these as keywords.
        check: raises ``ValueError`` for hyperparameters the rule cannot use; called where
            they enter (a shell's or the Lightning module's constructor).
        elementwise: True when each element of a parameter is updated from the same element of its
            gradient and state alone (scalar hyperparameters, or ones shaped like the parameter), so
            the rule gives the same numbers on tasks' weights stacked along a new leading dimension
            (what ``batch_tasks="fold"`` runs). False, the default, for a rule that reads a whole
            tensor (a norm, a matrix transform).
    """

    init: Callable[[Tensor, HParams], State]
    update: Callable[[Tensor, Tensor, State, HParams], tuple[Tensor, State]]
    scalar_state: tuple[str, ...] = ("step",)
    foreach: Callable[[list[Tensor], list[Tensor], list[State], HParams], tuple[list[Tensor], list[State]]] | None = None
    options: tuple[str, ...] = ()
    check: Callable[[HParams], None] | None = None
    elementwise: bool = False


FOREACH_MAX_MEAN_NUMEL = 4096


def apply_rule(
    rule: Rule,
    params: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    states: Sequence[State | None],
    hparams: Sequence[HParams],
    *,
    foreach: bool = True,
) -> tuple[list[Tensor], list[State | None]]:
    """Returns the parameters and states after one step of ``rule``: the one step every inner loop takes.

    Both the higher-compatible shells (:mod:`metaloop.optim.differentiable`) and the fast loop
    (:func:`metaloop.optim.loop.inner_loop`) call this, so they cannot drift apart.

    Args:
        params: the tensors to update.
        grads: one per parameter; ``None`` means the parameter got no gradient, and, as in
            ``torch.optim``, it is skipped: it does not move and its state (momentum, moments,
            step count) is neither created nor advanced.
        states: one per parameter; a falsy state (``None`` or ``{}``) is created by ``rule.init``
            at the parameter's first step.
        hparams: one mapping per parameter (values may be tensors that require grad, or any
            per-parameter object such as a learned transform).
        foreach: allow the rule's foreach form (False under :func:`torch.func.vmap`).

    Parameters whose hyperparameters are equal (numbers compared by value, tensors and other
    objects by identity) are updated together: with the foreach form when the rule has one, no
    hyperparameter is a tensor, and the mean tensor size is at most
    :data:`FOREACH_MAX_MEAN_NUMEL` elements. Foreach kernels save their inputs for backward, so
    they pay off for many small tensors (dispatch-bound), not for large ones.
    """
    new_params, new_states = list(params), list(states)
    active = [i for i, g in enumerate(grads) if g is not None]
    for i in active:
        if not new_states[i]:
            new_states[i] = rule.init(params[i], hparams[i])
    for group in _equal_hparams(active, hparams):
        hp = hparams[group[0]]
        ps, gs, ss = [params[i] for i in group], [grads[i] for i in group], [new_states[i] for i in group]
        if (
            foreach
            and rule.foreach is not None
            and sum(p.numel() for p in ps) <= FOREACH_MAX_MEAN_NUMEL * len(ps)
            and not any(_is_learned(v) for v in hp.values())
        ):
            updated_params, updated_states = rule.foreach(ps, gs, ss, hp)  # type: ignore[arg-type]
        else:
            updated = [rule.update(p, g, s, hp) for p, g, s in zip(ps, gs, ss)]  # type: ignore[arg-type]
            updated_params, updated_states = [u[0] for u in updated], [u[1] for u in updated]
        for i, p, s in zip(group, updated_params, updated_states):
            new_params[i], new_states[i] = p, s
    return new_params, new_states


def _equal_hparams(indices: list[int], hparams: Sequence[HParams]) -> list[list[int]]:
    """Returns ``indices`` grouped by equal hyperparameters, in order of first appearance."""
    groups: dict[Any, list[int]] = {}
    keys: dict[int, Any] = {}  # parameters often share one mapping: compare it once
    for i in indices:
        hp = hparams[i]
        key = keys.get(id(hp))
        if key is None:
            key = keys[id(hp)] = tuple((name, _value_key(v)) for name, v in hp.items())
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _value_key(value: Any) -> Any:
    """Returns a hashable stand-in for ``value``: itself for plain numbers, its identity for tensors and objects."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return tuple(_value_key(v) for v in value)
    return ("object", id(value))


def _is_learned(value: Any) -> bool:
    """True for a tensor, a per-parameter list, or a tuple holding a tensor (e.g. learned betas)."""
    if isinstance(value, tuple):
        return any(isinstance(v, Tensor) for v in value)
    return isinstance(value, (Tensor, list))


def safe_sqrt(x: Tensor) -> Tensor:
    """Returns ``sqrt(max(x, 0))`` whose derivative is 0 (not inf) where ``x <= 0``.

    The double ``where`` keeps the masked branch's derivative finite, so this is
    differentiable to any order and vmap-friendly (no custom autograd Function).
    """
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


def _is_set(h: Scalar) -> bool:
    """True unless ``h`` is a Python number equal to zero (a tensor may be learned away from 0)."""
    return isinstance(h, Tensor) or h != 0


def _prepare_grad(param: Tensor, grad: Tensor, hparams: HParams) -> Tensor:
    """Returns the gradient after ``maximize`` and coupled (L2) weight decay (per-tensor and foreach forms alike)."""
    if hparams.get("maximize", False):
        grad = -grad
    wd = hparams.get("weight_decay", 0)
    if _is_set(wd) and not hparams.get("decoupled_weight_decay", False):
        grad = grad + param * wd
    return grad


def _decay_param(param: Tensor, hparams: HParams) -> Tensor:
    """Returns the parameter after decoupled weight decay (AdamW), if configured."""
    wd = hparams.get("weight_decay", 0)
    if hparams.get("decoupled_weight_decay", False) and _is_set(wd):
        return param * (1 - hparams["lr"] * wd)
    return param


def _second_moment(state: State, exp_avg_sq: Tensor, hparams: HParams) -> tuple[Tensor, State]:
    """Returns the second moment Adam divides by, and the state it adds: AMSGrad's running maximum (Reddi et al. 2018)."""
    if not hparams.get("amsgrad", False):
        return exp_avg_sq, {}
    previous = state.get("max_exp_avg_sq")
    maximum = exp_avg_sq if previous is None else torch.maximum(previous, exp_avg_sq)
    return maximum, {"max_exp_avg_sq": maximum}


def _zeros(param: Tensor, hparams: HParams) -> Tensor:
    return torch.zeros_like(param, memory_format=torch.preserve_format)


# -- SGD ---------------------------------------------------------------------------------
def _sgd_init(param: Tensor, hparams: HParams) -> State:
    return {}


def _sgd_update(param: Tensor, grad: Tensor, state: State, hparams: HParams) -> tuple[Tensor, State]:
    """SGD with momentum, dampening, Nesterov momentum and weight decay (Sutskever et al. 2013).

    ``b_t = momentum * b_{t-1} + (1 - dampening) * g_t`` (``b_1 = g_1``);
    ``d_t = g_t + momentum * b_t`` if Nesterov else ``b_t``; ``p_t = p_{t-1} - lr * d_t``.
    Unlike ``torch.optim.SGD``, the first buffer is not detached, so hypergradients are exact.
    """
    grad = _prepare_grad(param, grad, hparams)
    momentum = hparams["momentum"]
    new_state: State = {}
    if _is_set(momentum):
        buf = state.get("momentum_buffer")
        buf = grad if buf is None else buf * momentum + grad * (1 - hparams["dampening"])
        new_state["momentum_buffer"] = buf
        grad = grad + buf * momentum if hparams["nesterov"] else buf
    return param - grad * hparams["lr"], new_state


def _sgd_foreach(
    params: list[Tensor], grads: list[Tensor], states: list[State], hparams: HParams
) -> tuple[list[Tensor], list[State]]:
    """:func:`_sgd_update` over a list of tensors with ``torch._foreach_*`` kernels."""
    grads = [_prepare_grad(p, g, hparams) for p, g in zip(params, grads)]
    momentum = hparams["momentum"]
    if momentum != 0:
        buffers = [s.get("momentum_buffer") for s in states]
        if any(b is None for b in buffers):
            buffers = [g if b is None else b * momentum + g * (1 - hparams["dampening"]) for b, g in zip(buffers, grads)]
        else:
            buffers = torch._foreach_add(torch._foreach_mul(buffers, momentum), grads, alpha=1 - hparams["dampening"])
        states = [{"momentum_buffer": b} for b in buffers]
        grads = torch._foreach_add(grads, buffers, alpha=momentum) if hparams["nesterov"] else buffers
    else:
        states = [{} for _ in params]
    return torch._foreach_add(params, grads, alpha=-hparams["lr"]), states


SGD = Rule(init=_sgd_init, update=_sgd_update, scalar_state=(), foreach=_sgd_foreach, elementwise=True)


# -- Adam / AdamW ------------------------------------------------------------------------
def _adam_init(param: Tensor, hparams: HParams) -> State:
    state: State = {"step": 0, "exp_avg": _zeros(param, hparams), "exp_avg_sq": _zeros(param, hparams)}
    if hparams.get("amsgrad", False):
        state["max_exp_avg_sq"] = _zeros(param, hparams)
    return state


def _adam_update(param: Tensor, grad: Tensor, state: State, hparams: HParams) -> tuple[Tensor, State]:
    """Adam (Kingma & Ba 2015) with AMSGrad (Reddi et al. 2018) and AdamW's decoupled decay
    (Loshchilov & Hutter 2019).

    ``m_t = beta1 m + (1-beta1) g``, ``v_t = beta2 v + (1-beta2) g^2``,
    ``p_t = p - lr / (1-beta1^t) * m_t / (sqrt(v_t / (1-beta2^t)) + eps)``.
    """
    step = state["step"] + 1
    beta1, beta2 = hparams["betas"]
    lr = hparams["lr"]
    param = _decay_param(param, hparams)
    grad = _prepare_grad(param, grad, hparams)
    exp_avg = torch.lerp(state["exp_avg"], grad, 1 - beta1)
    exp_avg_sq = state["exp_avg_sq"] * beta2 + grad * grad * (1 - beta2)
    second, amsgrad_state = _second_moment(state, exp_avg_sq, hparams)
    new_state: State = {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, **amsgrad_state}
    step_size = lr / (1 - beta1**step)
    denom = safe_sqrt(second) / (1 - beta2**step) ** 0.5 + hparams["eps"]
    return param - exp_avg / denom * step_size, new_state


def _adam_foreach(
    params: list[Tensor], grads: list[Tensor], states: list[State], hparams: HParams
) -> tuple[list[Tensor], list[State]]:
    """:func:`_adam_update` over a list of tensors with ``torch._foreach_*`` kernels.

    The square root is taken of ``max(v, tiny)`` (``tiny`` the dtype's smallest normal
    number): the same value to well below rounding of ``eps``, and, like :func:`safe_sqrt`,
    derivatives of every order that are zero (not infinite) where ``v`` is zero.
    """
    step = states[0]["step"] + 1
    if any(s["step"] + 1 != step for s in states):  # parameters skipped on earlier steps
        updated = [_adam_update(p, g, s, hparams) for p, g, s in zip(params, grads, states)]
        return [u[0] for u in updated], [u[1] for u in updated]
    beta1, beta2 = hparams["betas"]
    lr = hparams["lr"]
    params = [_decay_param(p, hparams) for p in params]
    grads = [_prepare_grad(p, g, hparams) for p, g in zip(params, grads)]
    exp_avg = torch._foreach_lerp([s["exp_avg"] for s in states], grads, 1 - beta1)
    exp_avg_sq = torch._foreach_addcmul(
        torch._foreach_mul([s["exp_avg_sq"] for s in states], beta2), grads, grads, value=1 - beta2
    )
    seconds = [_second_moment(s, v, hparams) for s, v in zip(states, exp_avg_sq)]
    second = [m for m, _ in seconds]
    root = torch._foreach_sqrt(torch._foreach_maximum(second, torch.finfo(params[0].dtype).tiny))
    denom = torch._foreach_add(torch._foreach_div(root, (1 - beta2**step) ** 0.5), hparams["eps"])
    # Not _foreach_addcdiv: its backward fails for lists of mixed shapes (PyTorch 2.13).
    new_params = torch._foreach_add(params, torch._foreach_div(exp_avg, denom), alpha=-lr / (1 - beta1**step))
    new_states: list[State] = [
        {"step": step, "exp_avg": m, "exp_avg_sq": v, **extra} for m, v, (_, extra) in zip(exp_avg, exp_avg_sq, seconds)
    ]
    return new_params, new_states


ADAM = Rule(init=_adam_init, update=_adam_update, foreach=_adam_foreach, elementwise=True)


# -- Adamax ------------------------------------------------------------------------------
def _adamax_init(param: Tensor, hparams: HParams) -> State:
    return {"step": 0, "exp_avg": _zeros(param, hparams), "exp_inf": _zeros(param, hparams)}


def _adamax_update(param: Tensor, grad: Tensor, state: State, hparams: HParams) -> tuple[Tensor, State]:
    """Adamax, Adam under the infinity norm (Kingma & Ba 2015, section 7).

    ``u_t = max(beta2 u, |g| + eps)``, ``p_t = p - lr / (1-beta1^t) * m_t / u_t``.
    """
    step = state["step"] + 1
    beta1, beta2 = hparams["betas"]
    grad = _prepare_grad(param, grad, hparams)
    exp_avg = torch.lerp(state["exp_avg"], grad, 1 - beta1)
    exp_inf = torch.maximum(state["exp_inf"] * beta2, grad.abs() + hparams["eps"])
    clr = hparams["lr"] / (1 - beta1**step)
    new_param = param - exp_avg / exp_inf * clr
    return new_param, {"step": step, "exp_avg": exp_avg, "exp_inf": exp_inf}


ADAMAX = Rule(init=_adamax_init, update=_adamax_update, elementwise=True)


# -- Adadelta ----------------------------------------------------------------------------
def _adadelta_init(param: Tensor, hparams: HParams) -> State:
    return {"step": 0, "square_avg": _zeros(param, hparams), "acc_delta": _zeros(param, hparams)}


def _adadelta_update(param: Tensor, grad: Tensor, state: State, hparams: HParams) -> tuple[Tensor, State]:
    """Adadelta (Zeiler 2012).

    ``v = rho v + (1-rho) g^2``, ``d = sqrt(u + eps) / sqrt(v + eps) * g``,
    ``u = rho u + (1-rho) d^2``, ``p_t = p - lr * d``.
    """
    rho, eps = hparams["rho"], hparams["eps"]
    grad = _prepare_grad(param, grad, hparams)
    square_avg = state["square_avg"] * rho + grad * grad * (1 - rho)
    std = safe_sqrt(square_avg + eps)
    delta = safe_sqrt(state["acc_delta"] + eps) / std * grad
    acc_delta = state["acc_delta"] * rho + delta * delta * (1 - rho)
    new_state = {"step": state["step"] + 1, "square_avg": square_avg, "acc_delta": acc_delta}
    return param - delta * hparams["lr"], new_state


ADADELTA = Rule(init=_adadelta_init, update=_adadelta_update, elementwise=True)


# -- Adagrad -----------------------------------------------------------------------------
def _adagrad_init(param: Tensor, hparams: HParams) -> State:
    initial = hparams.get("initial_accumulator_value", 0.0)
    return {"step": 0, "sum": torch.zeros_like(param) + initial}


def _adagrad_update(param: Tensor, grad: Tensor, state: State, hparams: HParams) -> tuple[Tensor, State]:
    """Adagrad (Duchi et al. 2011) with learning-rate decay.

    ``s = s + g^2``, ``p_t = p - lr / (1 + (t-1) lr_decay) * g / (sqrt(s) + eps)``.
    """
    step = state["step"] + 1
    grad = _prepare_grad(param, grad, hparams)
    clr = hparams["lr"] / (1 + (step - 1) * hparams["lr_decay"])
    total = state["sum"] + grad * grad
    std = safe_sqrt(total) + hparams["eps"]
    return param - grad / std * clr, {"step": step, "sum": total}


ADAGRAD = Rule(init=_adagrad_init, update=_adagrad_update, elementwise=True)


# -- ASGD --------------------------------------------------------------------------------
def _asgd_init(param: Tensor, hparams: HParams) -> State:
    return {"step": 0, "eta": hparams["lr"], "mu": 1.0, "ax": _zeros(param, hparams)}


def _asgd_update(param: Tensor, grad: Tensor, state: State, hparams: HParams) -> tuple[Tensor, State]:
    """Averaged SGD (Polyak & Juditsky 1992; schedule of Bottou 2012).

    ``p_t = p (1 - lambd eta) - eta g``; the average ``ax`` starts at step ``t0``;
    ``eta_t = lr / (1 + lambd lr t)^alpha``, ``mu_t = 1 / max(1, t - t0)``.
    """
    step = state["step"] + 1
    lr, lambd, alpha, t0 = hparams["lr"], hparams["lambd"], hparams["alpha"], hparams["t0"]
    grad = _prepare_grad(param, grad, hparams)
    eta, mu = state["eta"], state["mu"]
    param = param * (1 - lambd * eta) - grad * eta
    if isinstance(mu, Tensor) or mu != 1:
        ax = state["ax"] + (param - state["ax"]) * mu
    else:
        ax = param
    new_eta = lr / ((1 + lambd * lr * step) ** alpha)
    if isinstance(t0, Tensor):
        new_mu = 1 / torch.clamp(step - t0, min=1)
    else:
        new_mu = 1 / max(1, step - t0)
    return param, {"step": step, "eta": new_eta, "mu": new_mu, "ax": ax}


ASGD = Rule(init=_asgd_init, update=_asgd_update, scalar_state=("step", "eta", "mu"), elementwise=True)


# -- RMSprop -----------------------------------------------------------------------------
def _rmsprop_init(param: Tensor, hparams: HParams) -> State:
    state: State = {"step": 0, "square_avg": _zeros(param, hparams)}
    if _is_set(hparams.get("momentum", 0)):
        state["momentum_buffer"] = _zeros(param, hparams)
    if hparams.get("centered", False):
        state["grad_avg"] = _zeros(param, hparams)
    return state


def _rmsprop_update(param: Tensor, grad: Tensor, state: State, hparams: HParams) -> tuple[Tensor, State]:
    """RMSprop (Hinton's lecture 6e; centered variant of Graves 2013) with momentum.

    ``v = alpha v + (1-alpha) g^2``; centered: ``a = sqrt(v - gbar^2) + eps`` with
    ``gbar = alpha gbar + (1-alpha) g``, else ``a = sqrt(v) + eps``;
    momentum: ``b = momentum b + g / a``, ``p_t = p - lr b``; else ``p_t = p - lr g / a``.
    """
    alpha, momentum = hparams["alpha"], hparams["momentum"]
    grad = _prepare_grad(param, grad, hparams)
    square_avg = state["square_avg"] * alpha + grad * grad * (1 - alpha)
    new_state: State = {"step": state["step"] + 1, "square_avg": square_avg}
    if hparams["centered"]:
        grad_avg = torch.lerp(state.get("grad_avg", torch.zeros_like(param)), grad, 1 - alpha)
        new_state["grad_avg"] = grad_avg
        avg = safe_sqrt(square_avg - grad_avg * grad_avg)
    else:
        avg = safe_sqrt(square_avg)
    avg = avg + hparams["eps"]
    if _is_set(momentum):
        buf = state.get("momentum_buffer", torch.zeros_like(param)) * momentum + grad / avg
        new_state["momentum_buffer"] = buf
        return param - buf * hparams["lr"], new_state
    return param - grad / avg * hparams["lr"], new_state


RMSPROP = Rule(init=_rmsprop_init, update=_rmsprop_update, elementwise=True)


# -- Rprop -------------------------------------------------------------------------------
def _rprop_init(param: Tensor, hparams: HParams) -> State:
    return {"step": 0, "prev": _zeros(param, hparams), "step_size": torch.zeros_like(param) + hparams["lr"]}


def _sign(x: Tensor, temperature: Scalar) -> Tensor:
    """Returns ``sign(x)``, or ``tanh(x / temperature)`` when a positive temperature is set."""
    if _is_set(temperature):
        return torch.tanh(x / temperature)
    return torch.sign(x)


def _rprop_update(param: Tensor, grad: Tensor, state: State, hparams: HParams) -> tuple[Tensor, State]:
    """Rprop (Riedmiller & Braun 1993), iRprop- variant as in ``torch.optim.Rprop``.

    Per element: the step size grows by ``etaplus`` while the gradient keeps its sign and
    shrinks by ``etaminus`` when it flips (then that element skips the update);
    ``p_t = p - sign(g) * step_size``. The derivative of ``sign`` is zero, so the exact
    hypergradient through ``g`` is zero; ``smooth_sign=tau > 0`` (a metaloop option) uses
    ``tanh(g / tau)`` for the update direction instead, a smooth relaxation with non-zero
    second-order terms.
    """
    etaminus, etaplus = hparams["etas"]
    size_min, size_max = hparams["step_sizes"]
    if hparams.get("maximize", False):
        grad = -grad
    flip = torch.sign(grad * state["prev"])
    ones = torch.ones_like(param)
    factor = torch.where(flip > 0, ones * etaplus, torch.where(flip < 0, ones * etaminus, ones))
    step_size = torch.clamp(state["step_size"] * factor, size_min, size_max)
    grad = torch.where(flip < 0, torch.zeros_like(grad), grad)
    new_param = param - _sign(grad, hparams.get("smooth_sign", 0.0)) * step_size
    return new_param, {"step": state["step"] + 1, "prev": grad, "step_size": step_size}


def _rprop_check(hparams: HParams) -> None:
    smooth_sign = hparams.get("smooth_sign", 0.0)
    if not isinstance(smooth_sign, Tensor) and smooth_sign < 0:
        raise ValueError(f"smooth_sign={smooth_sign} must be >= 0 (0 keeps the exact sign; tau > 0 uses tanh(g / tau))")


RPROP = Rule(init=_rprop_init, update=_rprop_update, options=("smooth_sign",), check=_rprop_check, elementwise=True)


# -- NAdam -------------------------------------------------------------------------------
def _nadam_init(param: Tensor, hparams: HParams) -> State:
    return {"step": 0, "mu_product": 1.0, "exp_avg": _zeros(param, hparams), "exp_avg_sq": _zeros(param, hparams)}


def _nadam_update(param: Tensor, grad: Tensor, state: State, hparams: HParams) -> tuple[Tensor, State]:
    """NAdam, Adam with Nesterov momentum (Dozat 2016), with the momentum schedule
    ``mu_t = beta1 (1 - 0.5 * 0.96^(t * momentum_decay))`` and optional decoupled decay.
    """
    step = state["step"] + 1
    beta1, beta2 = hparams["betas"]
    lr, decay = hparams["lr"], hparams["momentum_decay"]
    bias_correction2 = 1 - beta2**step
    param = _decay_param(param, hparams)
    grad = _prepare_grad(param, grad, hparams)
    mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * decay)))
    mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * decay)))
    mu_product = state["mu_product"] * mu
    exp_avg = torch.lerp(state["exp_avg"], grad, 1 - beta1)
    exp_avg_sq = state["exp_avg_sq"] * beta2 + grad * grad * (1 - beta2)
    denom = safe_sqrt(exp_avg_sq / bias_correction2) + hparams["eps"]
    mu_product_next = mu_product * mu_next
    new_param = param + grad / denom * (-lr * (1.0 - mu) / (1.0 - mu_product))
    new_param = new_param + exp_avg / denom * (-lr * mu_next / (1.0 - mu_product_next))
    new_state = {"step": step, "mu_product": mu_product, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    return new_param, new_state


NADAM = Rule(init=_nadam_init, update=_nadam_update, scalar_state=("step", "mu_product"), elementwise=True)


# -- RAdam -------------------------------------------------------------------------------
def _radam_update(param: Tensor, grad: Tensor, state: State, hparams: HParams) -> tuple[Tensor, State]:
    """RAdam, Adam with a rectified adaptive learning rate (Liu et al. 2020).

    With ``rho_inf = 2/(1-beta2) - 1`` and ``rho_t = rho_inf - 2 t beta2^t / (1-beta2^t)``,
    the adaptive step (times the rectification ``r_t``) is used once ``rho_t > 5``, plain
    momentum SGD before. A learned (tensor) ``beta2`` selects the branch with ``where``.
    """
    step = state["step"] + 1
    beta1, beta2 = hparams["betas"]
    lr, eps = hparams["lr"], hparams["eps"]
    param = _decay_param(param, hparams)
    grad = _prepare_grad(param, grad, hparams)
    exp_avg = torch.lerp(state["exp_avg"], grad, 1 - beta1)
    exp_avg_sq = state["exp_avg_sq"] * beta2 + grad * grad * (1 - beta2)
    new_state = {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    corrected = exp_avg / bias_correction1
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2**step) / bias_correction2

    def adaptive() -> Tensor:
        return (bias_correction2**0.5) / (safe_sqrt(exp_avg_sq) + eps)

    def rect(rho: Scalar) -> Scalar:
        return ((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho)) ** 0.5

    if isinstance(rho_t, Tensor):
        # Evaluate the rectification where it is defined only, so its derivative stays finite.
        rectified = corrected * lr * adaptive() * rect(torch.clamp(rho_t, min=5.0 + 1e-6))
        update = torch.where(rho_t > 5.0, rectified, corrected * lr)
    elif rho_t > 5.0:
        update = corrected * lr * adaptive() * rect(rho_t)
    else:
        update = corrected * lr
    return param - update, new_state


RADAM = Rule(init=_adam_init, update=_radam_update, elementwise=True)


# -- Learned transforms -------------------------------------------------------------------
def apply_transform(transform: Callable[[Tensor], Tensor], grad: Tensor, name: str = "the parameter") -> Tensor:
    """Returns ``transform(grad)`` in ``grad``'s dtype, checked to be a tensor shaped like ``grad``.

    Under bfloat16 autocast a transform's products compute in bfloat16; its result is cast back to the
    gradient's dtype, so the step ``param - lr * update`` is float32 arithmetic like every other rule's.

    Raises:
        ValueError: naming ``name`` and both shapes, if the transform returns anything else.
    """
    update = check_update(transform(grad), grad, f"the transform of {name} ({type(transform).__name__})")
    return update.to(grad.dtype)


def check_update(update: object, grad: Tensor, source: str, gradient: str | None = None) -> Tensor:
    """Returns ``update`` if it is a tensor shaped like ``grad``, else raises ValueError naming ``source`` and both shapes.

    ``gradient`` describes the gradient in the message (default: ``"a gradient of shape (4, 3)"``).
    """
    if not isinstance(update, Tensor) or update.shape != grad.shape:
        got = tuple(update.shape) if isinstance(update, Tensor) else type(update).__name__
        gradient = gradient or f"a gradient of shape {tuple(grad.shape)}"
        raise ValueError(f"{source} returned {got} for {gradient}; a transform must return an update shaped like its gradient")
    return update


def transform_step(
    param: Tensor, grad: Tensor, transform: Callable[[Tensor], Tensor], lr: Scalar, name: str = "the parameter"
) -> Tensor:
    """Returns ``param - lr * transform(grad)``: one step of learned preconditioned gradient descent.

    With ``transform`` a Meta-Curvature or Kronecker preconditioner this is Meta-Curvature (Park &
    Oliva 2019) or Kronecker-factored MAML (Arnold et al. 2019); the transform's parameters get
    gradients through an unrolled loop. Pure, and differentiable in every input. ``name`` only
    labels errors (see :func:`apply_transform`).
    """
    return param - apply_transform(transform, grad, name) * lr


def _transform_update(param: Tensor, grad: Tensor, state: State, hparams: HParams) -> tuple[Tensor, State]:
    """Gradient-transform descent: :func:`transform_step` with ``hparams["transform"]``, a per-parameter module."""
    return transform_step(param, grad, hparams["transform"], hparams.get("lr", 1.0)), state


def _transform_check(hparams: HParams) -> None:
    if not callable(hparams.get("transform")):
        raise ValueError(
            f"the transform rule needs a callable 'transform' per parameter, got {hparams.get('transform')!r}; "
            "branch from a metaloop.transforms.TransformOptimizer, whose param groups hold one per parameter"
        )


TRANSFORM = Rule(init=_sgd_init, update=_transform_update, scalar_state=(), check=_transform_check)


OPTIMIZERS: dict[type[torch.optim.Optimizer], Rule] = {
    torch.optim.SGD: SGD,
    torch.optim.Adam: ADAM,
    torch.optim.AdamW: ADAM,
    torch.optim.Adamax: ADAMAX,
    torch.optim.Adadelta: ADADELTA,
    torch.optim.Adagrad: ADAGRAD,
    torch.optim.ASGD: ASGD,
    torch.optim.RMSprop: RMSPROP,
    torch.optim.Rprop: RPROP,
    torch.optim.NAdam: NADAM,
    torch.optim.RAdam: RADAM,
}
"""The optimizer table: each ``torch.optim`` type and the rule of its differentiable version.

The higher-named shells (``DifferentiableSGD``, ...), :func:`metaloop.optim.get_rule`, the
Lightning module's inner loop, the ``inner_optim`` configs and the tests all read this table;
:func:`metaloop.optim.register_optim` adds rows. A new optimizer is one rule and one row.
"""
