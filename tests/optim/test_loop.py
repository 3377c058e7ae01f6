"""The fast inner loop equals the higher-compatible shells, for every rule, sequentially and under vmap."""

from __future__ import annotations

import pytest
import torch
from optim_cases import OPTIONS, case_id
from torch import nn
from torch.func import functional_call, vmap

import metaloop
from metaloop.optim import OPTIMIZERS, get_rule
from metaloop.optim.hyperparams import per_parameter
from metaloop.optim.loop import inner_loop, inner_trajectory, vmap_problems
from metaloop.transforms import MetaCurvatureTransform, TransformOptimizer

STEPS = 3


def mse(out, y):
    return ((out - y) ** 2).mean()


class Net(nn.Module):
    """An MLP with a layer the loss never uses and a frozen parameter (requires_grad=False)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(2, 4)
        self.head = nn.Linear(4, 1)
        self.unused = nn.Linear(2, 2)
        self.frozen = nn.Parameter(torch.randn(4), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x) + self.frozen))


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net()


def task_data(tasks: int = 2):
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(tasks, 6, d, generator=gen) for d in (2, 1, 2, 1)]


def run_shell(net: Net, opt: torch.optim.Optimizer, lr: torch.Tensor, sx, sy, qx, qy):
    """Returns the adapted weights (by name) and the query loss, through innerloop_ctx with a learned lr."""
    with metaloop.innerloop_ctx(net, opt, copy_initial_weights=False, override={"lr": [lr]}) as (fmodel, diffopt):
        for _ in range(STEPS):
            diffopt.step(mse(fmodel(sx), sy))
        names = [n for n, _ in net.named_parameters()]
        return dict(zip(names, fmodel.parameters())), mse(fmodel(qx), qy)


def run_loop(net: Net, opt: torch.optim.Optimizer, lr: torch.Tensor, sx, sy, qx, qy, batched=False):
    """Returns the adapted weights and the query loss, through inner_loop with the same hyperparameters."""
    weights = dict(net.named_parameters())
    hparams = {n: {**hp, "lr": lr} for n, hp in zip(weights, per_parameter(opt.param_groups[0]))}

    def support_loss(w):
        return mse(functional_call(net, w, (sx,)), sy)

    adapted = inner_loop(support_loss, weights, rule=get_rule(type(opt)), hparams=hparams, steps=STEPS, batched=batched)
    return adapted, mse(functional_call(net, adapted, (qx,)), qy)


def check_paths_meet(net: Net, make_opt, lr0: float) -> None:
    sx, sy, qx, qy = (t[0] for t in task_data())
    trainable = [p for p in net.parameters() if p.requires_grad]
    results = []
    for run in (run_shell, run_loop):
        lr = torch.tensor(lr0, requires_grad=True)
        adapted, query = run(net, make_opt(net), lr, sx, sy, qx, qy)
        hypergrads = torch.autograd.grad(query, [*trainable, lr], allow_unused=True)
        results.append((adapted, query, hypergrads))
    (shell, shell_query, shell_grads), (loop, loop_query, loop_grads) = results
    for name in shell:
        torch.testing.assert_close(loop[name], shell[name], rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(loop_query, shell_query, rtol=1e-10, atol=1e-12)
    for a, b in zip(loop_grads, shell_grads):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    # As in torch.optim: a parameter without a gradient does not move (no momentum, decay or Adam step).
    for name in ("unused.weight", "unused.bias", "frozen"):
        assert torch.equal(loop[name], net.get_parameter(name)), name
        assert torch.equal(shell[name], net.get_parameter(name)), name


@pytest.mark.parametrize("case", OPTIONS, ids=case_id)
def test_inner_loop_matches_the_shells_for_every_rule(case, net):
    """Trajectories and hypergradients (initial weights, learned lr) agree to 1e-10 for every table row and option."""
    opt_type, kwargs, _ = case
    check_paths_meet(net, lambda model: opt_type(model.parameters(), **kwargs), kwargs["lr"])


def test_inner_loop_matches_the_shells_for_the_transform_rule(net):
    """p - lr * T(g): the same live transforms through both paths; hypergradients reach the transforms too."""
    opt = TransformOptimizer(net.parameters(), MetaCurvatureTransform, lr=0.1)
    with torch.no_grad():
        for p in opt.transform_parameters():
            p.add_(0.1 * torch.randn_like(p))
    check_paths_meet(net, lambda model: opt, 0.1)
    sx, sy, qx, qy = (t[0] for t in task_data())
    per_path = []
    for run in (run_shell, run_loop):
        _, query = run(net, opt, torch.tensor(0.1), sx, sy, qx, qy)
        per_path.append(torch.autograd.grad(query, list(opt.transform_parameters()), allow_unused=True))
    for a, b in zip(*per_path):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    assert any(g is not None and g.abs().max() > 0 for g in per_path[0])


def test_every_table_row_is_in_the_option_matrix():
    """The test cases cover the optimizer table: a new row without cases fails here."""
    assert {t for t, _, _ in OPTIONS} == set(OPTIMIZERS) - {TransformOptimizer}


@pytest.mark.parametrize("opt_type", [t for t in OPTIMIZERS if t is not TransformOptimizer], ids=lambda t: t.__name__)
def test_vmapped_inner_loop_equals_sequential_for_every_rule(opt_type, net):
    """Under vmap over tasks, every rule gives the task-by-task values and meta-gradients."""
    net.unused.requires_grad_(False)  # under vmap an unused weight gets a zero gradient, not none
    lr0 = 1.0 if opt_type is torch.optim.Adadelta else 0.05
    sx, sy, qx, qy = task_data()
    make = lambda: opt_type(net.parameters(), lr=lr0)  # noqa: E731
    lr = torch.tensor(lr0, requires_grad=True)
    sequential = torch.stack([run_loop(net, make(), lr, sx[i], sy[i], qx[i], qy[i])[1] for i in range(2)])
    batched = vmap(lambda *t: run_loop(net, make(), lr, *t, batched=True)[1])(sx, sy, qx, qy)
    torch.testing.assert_close(batched, sequential, rtol=1e-10, atol=1e-12)
    wrt = [net.body.weight, net.head.bias, lr]
    for a, b in zip(torch.autograd.grad(batched.sum(), wrt), torch.autograd.grad(sequential.sum(), wrt)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("first_order", [False, True])
def test_first_order_and_no_graph(net, first_order):
    """FOMAML's meta-gradient is the query gradient at the adapted weights; create_graph=False keeps no graph."""
    sx, sy, qx, qy = (t[0] for t in task_data())
    weights = {n: p for n, p in net.named_parameters() if n.startswith("head")}  # ANIL: the head only
    hp = per_parameter(torch.optim.SGD([torch.zeros(1)], lr=0.3, momentum=0.9).param_groups[0])[0]
    hparams = dict.fromkeys(weights, hp)

    def support_loss(w):
        return mse(functional_call(net, w, (sx,)), sy)

    adapted = inner_loop(support_loss, weights, rule=OPTIMIZERS[torch.optim.SGD], hparams=hparams, steps=2,
                         first_order=first_order)
    query = mse(functional_call(net, adapted, (qx,)), qy)
    meta = torch.autograd.grad(query, list(weights.values()))
    detached = {n: w.detach().requires_grad_() for n, w in adapted.items()}
    direct = torch.autograd.grad(mse(functional_call(net, detached, (qx,)), qy), list(detached.values()))
    for a, b in zip(meta, direct):
        if first_order:
            torch.testing.assert_close(a, b)
        else:
            assert (a - b).abs().max() > 1e-6
    frozen = inner_loop(support_loss, weights, rule=OPTIMIZERS[torch.optim.SGD], hparams=hparams, steps=4,
                        create_graph=False)
    assert all(w.grad_fn is None and not w.requires_grad for w in frozen.values())
    torch.testing.assert_close(frozen["head.weight"], inner_loop(
        support_loss, weights, rule=OPTIMIZERS[torch.optim.SGD], hparams=hparams, steps=4)["head.weight"].detach())


def test_errors_name_the_value(net):
    weights = dict(net.head.named_parameters())
    hp = {"lr": 0.1, "momentum": 0, "dampening": 0, "nesterov": False, "weight_decay": 0}
    rule = OPTIMIZERS[torch.optim.SGD]
    with pytest.raises(ValueError, match=r"missing \['weight'\], not among the weights \['nope'\]"):
        inner_loop(lambda w: w["bias"].sum(), weights, rule=rule, hparams={"bias": hp, "nope": hp}, steps=1)
    with pytest.raises(ValueError, match="steps=-1"):
        inner_loop(lambda w: w["bias"].sum(), weights, rule=rule, hparams=dict.fromkeys(weights, hp), steps=-1)


def test_transform_rule_checks_shape():
    rule = metaloop.optim.TRANSFORM
    p, g = torch.ones(3), torch.ones(3)
    new, _ = rule.update(p, g, {}, {"lr": 0.5, "transform": lambda grad: 2 * grad})
    torch.testing.assert_close(new, torch.zeros(3))
    with pytest.raises(ValueError, match=r"returned \(1, 3\) for a gradient of shape \(3,\)"):
        rule.update(p, g, {}, {"transform": lambda grad: grad.reshape(1, 3)})


def test_vmap_problems_name_batchnorm_and_first_order_vmap_matches():
    """PyTorch 2.13's vmap gets second-order BatchNorm gradients wrong: vmap_problems says so; first order is fine."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x, y = torch.randn(3, 6, 1, 6, 6), torch.randint(0, 3, (3, 6))
    hp = {"lr": 0.4, "momentum": 0, "dampening": 0, "nesterov": False, "weight_decay": 0}
    params = dict(model.named_parameters())
    ce = nn.functional.cross_entropy

    def task_loss(batched):
        def one(xi, yi):
            fast = inner_loop(lambda w: ce(functional_call(model, w, (xi,)), yi), params, rule=OPTIMIZERS[torch.optim.SGD],
                              hparams=dict.fromkeys(params, hp), steps=2, first_order=True, batched=batched)
            return ce(functional_call(model, fast, (xi,)), yi)
        return one

    assert any("normalization layers (1) get wrong second-order gradients under a plain vmap" in p for p in vmap_problems(model))
    assert vmap_problems(model, exact_norms=True) == []  # metaloop.nn.exact_norms makes them exact
    assert vmap_problems(model, second_order=False) == []
    batched = torch.autograd.grad(vmap(task_loss(True))(x, y).sum(), list(params.values()))
    sequential = torch.autograd.grad(sum(task_loss(False)(xi, yi) for xi, yi in zip(x, y)), list(params.values()))
    for a, b in zip(batched, sequential):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert vmap_problems(nn.BatchNorm1d(3)) != []
    assert vmap_problems(nn.Linear(2, 2)) == []


@pytest.mark.parametrize("batched", [False, True])
def test_trajectory_yields_every_step_with_its_hyperparameters_and_index(net, batched):
    """inner_trajectory: the weights after each step, step k using hparams[k] and the loss told k; its end is inner_loop's."""
    x, y = task_data(1)[:2]
    x, y = x[0], y[0]
    params = dict(net.named_parameters())
    sgd = {"momentum": 0, "dampening": 0, "nesterov": False, "weight_decay": 0}
    rates = [0.1, 0.3, 0.05]
    seen: list[int] = []

    def loss(weights, step):
        if not batched:
            seen.append(step)
        return mse(functional_call(net, weights, (x,)), y)

    def run(x_, y_):
        return list(inner_trajectory(lambda w, step: mse(functional_call(net, w, (x_,)), y_) if batched else loss(w, step),
                                     params, rule=OPTIMIZERS[torch.optim.SGD], batched=batched, steps=3,
                                     hparams=[dict.fromkeys(params, {**sgd, "lr": lr}) for lr in rates]))

    steps = vmap(run)(x[None], y[None]) if batched else run(x, y)
    assert len(steps) == 3 and seen == ([] if batched else [0, 1, 2])
    fast = dict(params)
    for lr, weights in zip(rates, steps):
        trainable = {n: w for n, w in fast.items() if w.requires_grad}
        grads = dict(zip(trainable, torch.autograd.grad(mse(functional_call(net, fast, (x,)), y), list(trainable.values()),
                                                        allow_unused=True)))
        fast = {n: w - lr * grads[n] if grads.get(n) is not None else w for n, w in fast.items()}
        for name, value in weights.items():
            torch.testing.assert_close(value[0] if batched else value, fast[name], rtol=1e-6, atol=1e-7)
    if not batched:
        last = inner_loop(lambda w: mse(functional_call(net, w, (x,)), y), params, rule=OPTIMIZERS[torch.optim.SGD], steps=3,
                          hparams=dict.fromkeys(params, {**sgd, "lr": 0.1}))
        again = list(inner_trajectory(lambda w, step: mse(functional_call(net, w, (x,)), y), params,
                                      rule=OPTIMIZERS[torch.optim.SGD], steps=3, hparams=dict.fromkeys(params, {**sgd, "lr": 0.1})))
        for name, value in last.items():
            torch.testing.assert_close(again[-1][name], value, rtol=0, atol=0)


def test_trajectory_checks_its_arguments_before_any_step(net):
    params = dict(net.named_parameters())
    hp = {"lr": 0.1, "momentum": 0, "dampening": 0, "nesterov": False, "weight_decay": 0}

    def never(weights, step):
        raise AssertionError("no step may run")

    with pytest.raises(ValueError, match="hparams has 2 per-step mappings for steps=3"):
        inner_trajectory(never, params, rule=OPTIMIZERS[torch.optim.SGD], steps=3, hparams=[dict.fromkeys(params, hp)] * 2)
    with pytest.raises(ValueError, match="missing"):
        inner_trajectory(never, params, rule=OPTIMIZERS[torch.optim.SGD], steps=0, hparams={})
