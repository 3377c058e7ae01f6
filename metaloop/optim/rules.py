"""Pure update rules: one function per ``torch.optim`` algorithm, over a single tensor.

Each rule is a pair, as in optax: ``init(param, hp) -> state`` and
``update(param, grad, state, hp) -> (new_param, new_state)``. ``hp`` maps hyperparameter
names (those of the ``torch.optim`` constructor) to values that may be Python numbers or
tensors that require grad; a rule treats both alike, so gradients flow into learned
hyperparameters. Rules never mutate their inputs and never read ``.data``, so they are
differentiable to any order and run under :func:`torch.func.vmap`. ``state["step"]`` is a
Python int: no host synchronisation in the inner loop.

The arithmetic follows PyTorch's single-tensor implementations (``torch/optim/*.py``) step
for step, so trajectories match ``torch.optim`` to rounding. Where PyTorch takes a square
root of a quantity that can be exactly zero (a moment estimate of an all-zero gradient),
:func:`safe_sqrt` is used: same value, and a zero (rather than infinite, hence NaN)
derivative at zero, so second-order gradients from a zero state are finite.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Union

import torch
from torch import Tensor

__all__ = ["Rule", "RULES", "apply_rule", "safe_sqrt"]

Scalar = Union[float, int, Tensor]
State = dict[str, Any]
Hyper = Mapping[str, Any]


class Rule(NamedTuple):
    """An update rule: ``init(param, hp) -> state`` and ``update(param, grad, state, hp) -> (param, state)``.

    ``scalar_state`` names the state entries that are scalars (kept as Python numbers when
    imported from a live optimizer; ``"step"`` becomes an int). ``foreach``, if given, is the
    same rule over a list of tensors sharing ``hp``, with ``torch._foreach_*`` kernels: it is
    used when every hyperparameter it reads is a Python number (see :func:`apply_rule`).
    """

    init: Callable[[Tensor, Hyper], State]
    update: Callable[[Tensor, Tensor, State, Hyper], tuple[Tensor, State]]
    scalar_state: tuple[str, ...] = ("step",)
    foreach: Callable[[list[Tensor], list[Tensor], list[State], Hyper], tuple[list[Tensor], list[State]]] | None = None
    foreach_hparams: tuple[str, ...] = ()


FOREACH_MAX_MEAN_NUMEL = 4096


def apply_rule(
    rule: Rule, params: list[Tensor], grads: list[Tensor], states: list[State], hp: Hyper, foreach: bool = True
) -> tuple[list[Tensor], list[State]]:
    """Returns ``rule`` applied to each ``(param, grad, state)`` with shared hyperparameters ``hp``.

    Uses the rule's foreach form when it has one and the hyperparameters it reads are Python
    numbers (one kernel per list, one autograd node: faster, same values to rounding), else
    the per-tensor form (always, with ``foreach=False``, e.g. under vmap).

    Foreach kernels save their inputs for backward, so each step of an unrolled graph keeps
    the gradients alive, where per-tensor ops save nothing; they pay off for many small
    tensors (dispatch-bound), not for large ones (bandwidth-bound). They are used when the
    mean tensor size is at most :data:`FOREACH_MAX_MEAN_NUMEL` elements.
    """
    if (
        foreach
        and rule.foreach is not None
        and params
        and sum(p.numel() for p in params) <= FOREACH_MAX_MEAN_NUMEL * len(params)
        and not any(_is_learned(hp.get(k)) for k in rule.foreach_hparams)
    ):
        return rule.foreach(params, grads, states, hp)
    updated = [rule.update(p, g, s, hp) for p, g, s in zip(params, grads, states)]
    return [u[0] for u in updated], [u[1] for u in updated]


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


def _prepare_grad(param: Tensor, grad: Tensor, hp: Hyper) -> Tensor:
    """Returns the gradient after ``maximize`` and coupled (L2) weight decay."""
    if hp.get("maximize", False):
        grad = -grad
    wd = hp.get("weight_decay", 0)
    if _is_set(wd) and not hp.get("decoupled_weight_decay", False):
        grad = grad + param * wd
    return grad


def _decay_param(param: Tensor, hp: Hyper) -> Tensor:
    """Returns the parameter after decoupled weight decay (AdamW), if configured."""
    wd = hp.get("weight_decay", 0)
    if hp.get("decoupled_weight_decay", False) and _is_set(wd):
        return param * (1 - hp["lr"] * wd)
    return param


def _zeros(param: Tensor, hp: Hyper) -> Tensor:
    return torch.zeros_like(param, memory_format=torch.preserve_format)


# -- SGD ---------------------------------------------------------------------------------
def _sgd_init(param: Tensor, hp: Hyper) -> State:
    return {}


def _sgd_update(param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
    """SGD with momentum, dampening, Nesterov momentum and weight decay (Sutskever et al. 2013).

    ``b_t = momentum * b_{t-1} + (1 - dampening) * g_t`` (``b_1 = g_1``);
    ``d_t = g_t + momentum * b_t`` if Nesterov else ``b_t``; ``p_t = p_{t-1} - lr * d_t``.
    Unlike ``torch.optim.SGD``, the first buffer is not detached, so hypergradients are exact.
    """
    grad = _prepare_grad(param, grad, hp)
    momentum = hp["momentum"]
    new_state: State = {}
    if _is_set(momentum):
        buf = state.get("momentum_buffer")
        buf = grad if buf is None else buf * momentum + grad * (1 - hp["dampening"])
        new_state["momentum_buffer"] = buf
        grad = grad + buf * momentum if hp["nesterov"] else buf
    return param - grad * hp["lr"], new_state


def _sgd_foreach(
    params: list[Tensor], grads: list[Tensor], states: list[State], hp: Hyper
) -> tuple[list[Tensor], list[State]]:
    """:func:`_sgd_update` over a list of tensors with ``torch._foreach_*`` kernels."""
    if hp.get("maximize", False):
        grads = torch._foreach_neg(grads)
    if hp.get("weight_decay", 0) != 0:
        grads = torch._foreach_add(grads, params, alpha=hp["weight_decay"])
    momentum = hp["momentum"]
    if momentum != 0:
        buffers = [s.get("momentum_buffer") for s in states]
        if any(b is None for b in buffers):
            buffers = [g if b is None else b * momentum + g * (1 - hp["dampening"]) for b, g in zip(buffers, grads)]
        else:
            buffers = torch._foreach_add(torch._foreach_mul(buffers, momentum), grads, alpha=1 - hp["dampening"])
        states = [{"momentum_buffer": b} for b in buffers]
        grads = torch._foreach_add(grads, buffers, alpha=momentum) if hp["nesterov"] else buffers
    else:
        states = [{} for _ in params]
    return torch._foreach_add(params, grads, alpha=-hp["lr"]), states


SGD = Rule(_sgd_init, _sgd_update, (), _sgd_foreach, ("lr", "momentum", "dampening", "weight_decay"))


# -- Adam / AdamW ------------------------------------------------------------------------
def _adam_init(param: Tensor, hp: Hyper) -> State:
    state: State = {"step": 0, "exp_avg": _zeros(param, hp), "exp_avg_sq": _zeros(param, hp)}
    if hp.get("amsgrad", False):
        state["max_exp_avg_sq"] = _zeros(param, hp)
    return state


def _adam_update(param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
    """Adam (Kingma & Ba 2015) with AMSGrad (Reddi et al. 2018) and AdamW's decoupled decay
    (Loshchilov & Hutter 2019).

    ``m_t = beta1 m + (1-beta1) g``, ``v_t = beta2 v + (1-beta2) g^2``,
    ``p_t = p - lr / (1-beta1^t) * m_t / (sqrt(v_t / (1-beta2^t)) + eps)``.
    """
    step = state["step"] + 1
    beta1, beta2 = hp["betas"]
    lr = hp["lr"]
    param = _decay_param(param, hp)
    grad = _prepare_grad(param, grad, hp)
    exp_avg = torch.lerp(state["exp_avg"], grad, 1 - beta1)
    exp_avg_sq = state["exp_avg_sq"] * beta2 + grad * grad * (1 - beta2)
    new_state: State = {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    second = exp_avg_sq
    if hp.get("amsgrad", False):
        previous = state.get("max_exp_avg_sq")
        second = exp_avg_sq if previous is None else torch.maximum(previous, exp_avg_sq)
        new_state["max_exp_avg_sq"] = second
    step_size = lr / (1 - beta1**step)
    denom = safe_sqrt(second) / (1 - beta2**step) ** 0.5 + hp["eps"]
    return param - exp_avg / denom * step_size, new_state


def _adam_foreach(
    params: list[Tensor], grads: list[Tensor], states: list[State], hp: Hyper
) -> tuple[list[Tensor], list[State]]:
    """:func:`_adam_update` over a list of tensors with ``torch._foreach_*`` kernels.

    The square root is taken of ``max(v, tiny)`` (``tiny`` the dtype's smallest normal
    number): the same value to well below rounding of ``eps``, and, like :func:`safe_sqrt`,
    derivatives of every order that are zero (not infinite) where ``v`` is zero.
    """
    step = states[0]["step"] + 1
    if any(s["step"] + 1 != step for s in states):  # parameters skipped on earlier steps
        updated = [_adam_update(p, g, s, hp) for p, g, s in zip(params, grads, states)]
        return [u[0] for u in updated], [u[1] for u in updated]
    beta1, beta2 = hp["betas"]
    lr, wd = hp["lr"], hp.get("weight_decay", 0)
    if wd != 0 and hp.get("decoupled_weight_decay", False):
        params = torch._foreach_mul(params, 1 - lr * wd)
    if hp.get("maximize", False):
        grads = torch._foreach_neg(grads)
    if wd != 0 and not hp.get("decoupled_weight_decay", False):
        grads = torch._foreach_add(grads, params, alpha=wd)
    exp_avg = torch._foreach_lerp([s["exp_avg"] for s in states], grads, 1 - beta1)
    exp_avg_sq = torch._foreach_addcmul(
        torch._foreach_mul([s["exp_avg_sq"] for s in states], beta2), grads, grads, value=1 - beta2
    )
    second = exp_avg_sq
    amsgrad = hp.get("amsgrad", False)
    if amsgrad:
        second = torch._foreach_maximum([s.get("max_exp_avg_sq", torch.zeros_like(p)) for s, p in zip(states, params)], exp_avg_sq)
    root = torch._foreach_sqrt(torch._foreach_maximum(second, torch.finfo(params[0].dtype).tiny))
    denom = torch._foreach_add(torch._foreach_div(root, (1 - beta2**step) ** 0.5), hp["eps"])
    # Not _foreach_addcdiv: its backward fails for lists of mixed shapes (PyTorch 2.13).
    new_params = torch._foreach_add(params, torch._foreach_div(exp_avg, denom), alpha=-lr / (1 - beta1**step))
    new_states: list[State] = [
        {"step": step, "exp_avg": m, "exp_avg_sq": v} for m, v in zip(exp_avg, exp_avg_sq)
    ]
    if amsgrad:
        for state, maximum in zip(new_states, second):
            state["max_exp_avg_sq"] = maximum
    return new_params, new_states


ADAM = Rule(_adam_init, _adam_update, ("step",), _adam_foreach, ("lr", "betas", "eps", "weight_decay"))


# -- Adamax ------------------------------------------------------------------------------
def _adamax_init(param: Tensor, hp: Hyper) -> State:
    return {"step": 0, "exp_avg": _zeros(param, hp), "exp_inf": _zeros(param, hp)}


def _adamax_update(param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
    """Adamax, Adam under the infinity norm (Kingma & Ba 2015, section 7).

    ``u_t = max(beta2 u, |g| + eps)``, ``p_t = p - lr / (1-beta1^t) * m_t / u_t``.
    """
    step = state["step"] + 1
    beta1, beta2 = hp["betas"]
    grad = _prepare_grad(param, grad, hp)
    exp_avg = torch.lerp(state["exp_avg"], grad, 1 - beta1)
    exp_inf = torch.maximum(state["exp_inf"] * beta2, grad.abs() + hp["eps"])
    clr = hp["lr"] / (1 - beta1**step)
    new_param = param - exp_avg / exp_inf * clr
    return new_param, {"step": step, "exp_avg": exp_avg, "exp_inf": exp_inf}


ADAMAX = Rule(_adamax_init, _adamax_update)


# -- Adadelta ----------------------------------------------------------------------------
def _adadelta_init(param: Tensor, hp: Hyper) -> State:
    return {"step": 0, "square_avg": _zeros(param, hp), "acc_delta": _zeros(param, hp)}


def _adadelta_update(param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
    """Adadelta (Zeiler 2012).

    ``v = rho v + (1-rho) g^2``, ``d = sqrt(u + eps) / sqrt(v + eps) * g``,
    ``u = rho u + (1-rho) d^2``, ``p_t = p - lr * d``.
    """
    rho, eps = hp["rho"], hp["eps"]
    grad = _prepare_grad(param, grad, hp)
    square_avg = state["square_avg"] * rho + grad * grad * (1 - rho)
    std = safe_sqrt(square_avg + eps)
    delta = safe_sqrt(state["acc_delta"] + eps) / std * grad
    acc_delta = state["acc_delta"] * rho + delta * delta * (1 - rho)
    new_state = {"step": state["step"] + 1, "square_avg": square_avg, "acc_delta": acc_delta}
    return param - delta * hp["lr"], new_state


ADADELTA = Rule(_adadelta_init, _adadelta_update)


# -- Adagrad -----------------------------------------------------------------------------
def _adagrad_init(param: Tensor, hp: Hyper) -> State:
    initial = hp.get("initial_accumulator_value", 0.0)
    return {"step": 0, "sum": torch.zeros_like(param) + initial}


def _adagrad_update(param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
    """Adagrad (Duchi et al. 2011) with learning-rate decay.

    ``s = s + g^2``, ``p_t = p - lr / (1 + (t-1) lr_decay) * g / (sqrt(s) + eps)``.
    """
    step = state["step"] + 1
    grad = _prepare_grad(param, grad, hp)
    clr = hp["lr"] / (1 + (step - 1) * hp["lr_decay"])
    total = state["sum"] + grad * grad
    std = safe_sqrt(total) + hp["eps"]
    return param - grad / std * clr, {"step": step, "sum": total}


ADAGRAD = Rule(_adagrad_init, _adagrad_update)


# -- ASGD --------------------------------------------------------------------------------
def _asgd_init(param: Tensor, hp: Hyper) -> State:
    return {"step": 0, "eta": hp["lr"], "mu": 1.0, "ax": _zeros(param, hp)}


def _asgd_update(param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
    """Averaged SGD (Polyak & Juditsky 1992; schedule of Bottou 2012).

    ``p_t = p (1 - lambd eta) - eta g``; the average ``ax`` starts at step ``t0``;
    ``eta_t = lr / (1 + lambd lr t)^alpha``, ``mu_t = 1 / max(1, t - t0)``.
    """
    step = state["step"] + 1
    lr, lambd, alpha, t0 = hp["lr"], hp["lambd"], hp["alpha"], hp["t0"]
    grad = _prepare_grad(param, grad, hp)
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


ASGD = Rule(_asgd_init, _asgd_update, ("step", "eta", "mu"))


# -- RMSprop -----------------------------------------------------------------------------
def _rmsprop_init(param: Tensor, hp: Hyper) -> State:
    state: State = {"step": 0, "square_avg": _zeros(param, hp)}
    if _is_set(hp.get("momentum", 0)):
        state["momentum_buffer"] = _zeros(param, hp)
    if hp.get("centered", False):
        state["grad_avg"] = _zeros(param, hp)
    return state


def _rmsprop_update(param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
    """RMSprop (Hinton's lecture 6e; centered variant of Graves 2013) with momentum.

    ``v = alpha v + (1-alpha) g^2``; centered: ``a = sqrt(v - gbar^2) + eps`` with
    ``gbar = alpha gbar + (1-alpha) g``, else ``a = sqrt(v) + eps``;
    momentum: ``b = momentum b + g / a``, ``p_t = p - lr b``; else ``p_t = p - lr g / a``.
    """
    alpha, momentum = hp["alpha"], hp["momentum"]
    grad = _prepare_grad(param, grad, hp)
    square_avg = state["square_avg"] * alpha + grad * grad * (1 - alpha)
    new_state: State = {"step": state["step"] + 1, "square_avg": square_avg}
    if hp["centered"]:
        grad_avg = torch.lerp(state.get("grad_avg", torch.zeros_like(param)), grad, 1 - alpha)
        new_state["grad_avg"] = grad_avg
        avg = safe_sqrt(square_avg - grad_avg * grad_avg)
    else:
        avg = safe_sqrt(square_avg)
    avg = avg + hp["eps"]
    if _is_set(momentum):
        buf = state.get("momentum_buffer", torch.zeros_like(param)) * momentum + grad / avg
        new_state["momentum_buffer"] = buf
        return param - buf * hp["lr"], new_state
    return param - grad / avg * hp["lr"], new_state


RMSPROP = Rule(_rmsprop_init, _rmsprop_update)


# -- Rprop -------------------------------------------------------------------------------
def _rprop_init(param: Tensor, hp: Hyper) -> State:
    return {"step": 0, "prev": _zeros(param, hp), "step_size": torch.zeros_like(param) + hp["lr"]}


def _sign(x: Tensor, temperature: Scalar) -> Tensor:
    """Returns ``sign(x)``, or ``tanh(x / temperature)`` when a positive temperature is set."""
    if _is_set(temperature):
        return torch.tanh(x / temperature)
    return torch.sign(x)


def _rprop_update(param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
    """Rprop (Riedmiller & Braun 1993), iRprop- variant as in ``torch.optim.Rprop``.

    Per element: the step size grows by ``etaplus`` while the gradient keeps its sign and
    shrinks by ``etaminus`` when it flips (then that element skips the update);
    ``p_t = p - sign(g) * step_size``. The derivative of ``sign`` is zero, so the exact
    hypergradient through ``g`` is zero; ``smooth_sign=tau > 0`` (a metaloop option) uses
    ``tanh(g / tau)`` for the update direction instead, a smooth relaxation with non-zero
    second-order terms.
    """
    etaminus, etaplus = hp["etas"]
    size_min, size_max = hp["step_sizes"]
    if hp.get("maximize", False):
        grad = -grad
    flip = torch.sign(grad * state["prev"])
    ones = torch.ones_like(param)
    factor = torch.where(flip > 0, ones * etaplus, torch.where(flip < 0, ones * etaminus, ones))
    step_size = torch.clamp(state["step_size"] * factor, size_min, size_max)
    grad = torch.where(flip < 0, torch.zeros_like(grad), grad)
    new_param = param - _sign(grad, hp.get("smooth_sign", 0.0)) * step_size
    return new_param, {"step": state["step"] + 1, "prev": grad, "step_size": step_size}


RPROP = Rule(_rprop_init, _rprop_update)


# -- NAdam -------------------------------------------------------------------------------
def _nadam_init(param: Tensor, hp: Hyper) -> State:
    return {"step": 0, "mu_product": 1.0, "exp_avg": _zeros(param, hp), "exp_avg_sq": _zeros(param, hp)}


def _nadam_update(param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
    """NAdam, Adam with Nesterov momentum (Dozat 2016), with the momentum schedule
    ``mu_t = beta1 (1 - 0.5 * 0.96^(t * momentum_decay))`` and optional decoupled decay.
    """
    step = state["step"] + 1
    beta1, beta2 = hp["betas"]
    lr, decay = hp["lr"], hp["momentum_decay"]
    bias_correction2 = 1 - beta2**step
    param = _decay_param(param, hp)
    grad = _prepare_grad(param, grad, hp)
    mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * decay)))
    mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * decay)))
    mu_product = state["mu_product"] * mu
    exp_avg = torch.lerp(state["exp_avg"], grad, 1 - beta1)
    exp_avg_sq = state["exp_avg_sq"] * beta2 + grad * grad * (1 - beta2)
    denom = safe_sqrt(exp_avg_sq / bias_correction2) + hp["eps"]
    mu_product_next = mu_product * mu_next
    new_param = param + grad / denom * (-lr * (1.0 - mu) / (1.0 - mu_product))
    new_param = new_param + exp_avg / denom * (-lr * mu_next / (1.0 - mu_product_next))
    new_state = {"step": step, "mu_product": mu_product, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    return new_param, new_state


NADAM = Rule(_nadam_init, _nadam_update, ("step", "mu_product"))


# -- RAdam -------------------------------------------------------------------------------
def _radam_update(param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
    """RAdam, Adam with a rectified adaptive learning rate (Liu et al. 2020).

    With ``rho_inf = 2/(1-beta2) - 1`` and ``rho_t = rho_inf - 2 t beta2^t / (1-beta2^t)``,
    the adaptive step (times the rectification ``r_t``) is used once ``rho_t > 5``, plain
    momentum SGD before. A learned (tensor) ``beta2`` selects the branch with ``where``.
    """
    step = state["step"] + 1
    beta1, beta2 = hp["betas"]
    lr, eps = hp["lr"], hp["eps"]
    param = _decay_param(param, hp)
    grad = _prepare_grad(param, grad, hp)
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


RADAM = Rule(_adam_init, _radam_update)


# -- Learned transforms -------------------------------------------------------------------
def _transform_update(param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
    """Gradient-transform descent: ``p_t = p - lr * T(g)``, ``T = hp["transform"]`` a trainable module.

    With ``T`` a Meta-Curvature or Kronecker preconditioner this is Meta-Curvature (Park &
    Oliva 2019) or Kronecker-factored MAML (Arnold et al. 2019); ``T``'s parameters get
    gradients through the unrolled loop.
    """
    update = hp["transform"](grad)
    if update.shape != grad.shape:
        raise ValueError(
            f"the transform returned an update of shape {tuple(update.shape)} for a gradient of "
            f"shape {tuple(grad.shape)}; it must return the gradient's shape"
        )
    return param - update * hp.get("lr", 1.0), state


TRANSFORM = Rule(_sgd_init, _transform_update, ())


RULES: dict[str, Rule] = {
    "sgd": SGD,
    "adam": ADAM,
    "adamax": ADAMAX,
    "adadelta": ADADELTA,
    "adagrad": ADAGRAD,
    "asgd": ASGD,
    "rmsprop": RMSPROP,
    "rprop": RPROP,
    "nadam": NADAM,
    "radam": RADAM,
    "transform": TRANSFORM,
}
