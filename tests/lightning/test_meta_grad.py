"""MetaLightningModule's meta-gradient modes (meta_grad = unrolled | truncated | implicit) against references by hand."""

from __future__ import annotations

import lightning
import pytest
import torch
import torch.nn.functional as F
from lightning_cases import sinusoid_batch, sinusoid_module
from torch.func import functional_call
from torch.utils.data import DataLoader

from metaloop.lightning import PerElement
from metaloop.optim.implicit import ImplicitOptions
from metaloop.tasks import Task

LR, LAM = 0.05, 2.0

@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)

def fit(module, batches: list[Task]):
    """Returns ``module`` after one meta-step (outer SGD, lr 0.1) per batch."""
    trainer = lightning.Trainer(accelerator="cpu", devices=1, max_steps=len(batches), logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return module

def truncated_reference(module, batch: Task, steps: int, truncate: int) -> dict[str, torch.Tensor]:
    """Returns the parameters after one outer SGD step of MAML truncated to the last ``truncate`` of ``steps``, by hand."""
    params = dict(module.model.named_parameters())
    losses = []
    for i in range(batch.support_x.shape[0]):
        fast = dict(params)
        for t in range(steps):
            tracked = t >= steps - truncate
            wrt = {n: w if tracked else w.detach().requires_grad_() for n, w in fast.items()}
            loss = F.mse_loss(functional_call(module.model, wrt, (batch.support_x[i],)), batch.support_y[i])
            grads = torch.autograd.grad(loss, list(wrt.values()), create_graph=tracked)
            fast = {n: w - LR * g if tracked else (w - LR * g).detach() for (n, w), g in zip(wrt.items(), grads)}
            if t == steps - truncate - 1:
                fast = {n: params[n] + (w - params[n]).detach() for n, w in fast.items()}
        losses.append(F.mse_loss(functional_call(module.model, fast, (batch.query_x[i],)), batch.query_y[i]))
    meta_grads = torch.autograd.grad(torch.stack(losses).mean(), list(params.values()))
    return {n: (p - 0.1 * g).detach() for (n, p), g in zip(params.items(), meta_grads)}

@pytest.mark.parametrize("batch_tasks", ["vmap", "sequential"])
def test_truncated_meta_step_equals_truncation_by_hand(batch_tasks):
    module = sinusoid_module(meta_grad="truncated", truncate=2, inner_steps=3, batch_tasks=batch_tasks)
    batch = sinusoid_batch(3)
    expected = truncated_reference(module, batch, steps=3, truncate=2)
    fit(module, [batch])
    for name, param in module.model.named_parameters():
        torch.testing.assert_close(param.detach(), expected[name], rtol=1e-5, atol=1e-6)

def test_truncate_equal_to_inner_steps_is_the_unrolled_meta_step():
    batches = [sinusoid_batch(3)]
    unrolled = fit(sinusoid_module(inner_steps=3, learnable={"lr": PerElement()}), batches).state_dict()
    truncated = fit(sinusoid_module(inner_steps=3, learnable={"lr": PerElement()}, meta_grad="truncated", truncate=3),
                    batches).state_dict()
    for key, value in unrolled.items():
        assert torch.equal(value, truncated[key]), key

def proximal_descent(module, x, y, steps: int) -> dict[str, torch.Tensor]:
    """Returns ``steps`` of SGD (lr ``LR``) on the support loss plus ``LAM/2 ||phi - theta||^2``, by hand."""
    theta = {n: p.detach() for n, p in module.model.named_parameters()}
    phi = {n: p.clone().requires_grad_() for n, p in theta.items()}
    for _ in range(steps):
        loss = F.mse_loss(functional_call(module.model, phi, (x,)), y)
        loss = loss + LAM / 2 * sum(((phi[n] - theta[n]) ** 2).sum() for n in phi)
        grads = torch.autograd.grad(loss, list(phi.values()))
        phi = {n: (w - LR * g).detach().requires_grad_() for (n, w), g in zip(phi.items(), grads)}
    return phi

def test_implicit_meta_gradient_equals_the_implicit_function_theorem(float64):
    """(I + H/lam)^-1 g_query, with the support loss's Hessian H built explicitly and solved exactly."""
    steps = 60
    module = sinusoid_module(meta_grad="implicit", inner_steps=steps, batch_tasks="sequential",
                             implicit={"lam": LAM, "maxiter": 100, "tol": 1e-14}).double()
    batch = Task(*(field[0].double() for field in sinusoid_batch(1)))
    phi = proximal_descent(module, batch.support_x, batch.support_y, steps)

    adapted = module.adapt((batch.support_x, batch.support_y), steps=steps)  # evaluation adapts the same way
    for name, value in phi.items():
        torch.testing.assert_close(adapted.weights[name], value.detach(), rtol=1e-10, atol=1e-12)

    loss, _ = module.task_loss(*batch, batched=False)
    grads = torch.autograd.grad(loss, list(module.model.parameters()))

    names, shapes = list(phi), [p.shape for p in phi.values()]
    flat = torch.cat([p.detach().flatten() for p in phi.values()])

    def unflatten(v):
        return dict(zip(names, (c.view(s) for c, s in zip(v.split([s.numel() for s in shapes]), shapes))))

    def support(v):
        return F.mse_loss(functional_call(module.model, unflatten(v), (batch.support_x,)), batch.support_y)

    hessian = torch.autograd.functional.hessian(support, flat)
    query_grad = torch.func.grad(
        lambda v: F.mse_loss(functional_call(module.model, unflatten(v), (batch.query_x,)), batch.query_y))(flat)
    system = torch.eye(len(flat)) + hessian / LAM
    assert torch.linalg.eigvalsh(system).min() > 0  # conjugate gradient applies
    expected = torch.linalg.solve(system, query_grad)
    torch.testing.assert_close(torch.cat([g.flatten() for g in grads]), expected, rtol=1e-6, atol=1e-10)

def test_implicit_vmap_and_sequential_meta_steps_agree():
    batches = [sinusoid_batch(3), sinusoid_batch(3, k=4)]
    results = [
        fit(sinusoid_module(meta_grad="implicit", inner_steps=5, batch_tasks=b, implicit=ImplicitOptions(lam=20.0)),  # I + H/lam positive definite
            batches).state_dict()
        for b in ("vmap", "sequential")
    ]
    start = sinusoid_module().state_dict()
    for key, value in results[0].items():
        torch.testing.assert_close(value, results[1][key], rtol=1e-5, atol=1e-6)
        assert not torch.equal(value, start[key]), f"{key} must train"

@pytest.mark.parametrize("kwargs, message", [
    (dict(meta_grad="bptt"), "meta_grad='bptt' is not accepted \\(not one of the choices\\); use one of unrolled, truncated, implicit"),
    (dict(meta_grad="truncated"), "meta_grad='truncated' needs truncate=k"),
    (dict(meta_grad="truncated", truncate=4, inner_steps=3), "truncate=4 must be an int in 0..steps=3"),
    (dict(meta_grad="truncated", truncate=0, inner_steps=3), "truncate=0 is not accepted \\(it is below 1\\)"),
    (dict(truncate=2, inner_steps=3), "truncate=2 applies only with meta_grad='truncated'"),
    (dict(meta_grad="truncated", truncate=1, first_order=True), "first_order=True drops"),
    (dict(meta_grad="implicit", first_order=True), "first_order=True drops"),
    (dict(meta_grad="implicit", learnable={"lr": PerElement()}), "meta_grad='implicit' gives learned inner"),
    (dict(meta_grad="implicit", adapt_params="^head\\."), "meta_grad='implicit' adapts all parameters"),
    (dict(meta_grad="implicit", implicit={"lam": 0.0}), "lam=0.0 is not accepted \\(it is below 1e-12\\)"),
    (dict(meta_grad="implicit", implicit={"solver": "lu"}), "solver='lu' is not accepted \\(not one of the choices\\); use one of cg, neumann"),
])
def test_bad_meta_grad_options_raise_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sinusoid_module(**kwargs)

def test_adapt_with_a_graph_uses_the_mode():
    """MetaLightningModule.adapt(create_graph=True) keeps the truncated graph: the lr-free first steps are first-order."""
    module = sinusoid_module(meta_grad="truncated", truncate=1, inner_steps=2)
    batch = sinusoid_batch(1)
    support, query = (batch.support_x[0], batch.support_y[0]), (batch.query_x[0], batch.query_y[0])
    fmodel = module.adapt(support, steps=2, create_graph=True)
    loss = module.outer_loss(fmodel, query)
    got = torch.autograd.grad(loss, list(module.model.parameters()))
    reference = truncated_reference(module, batch, steps=2, truncate=1)
    for (name, p), g in zip(module.model.named_parameters(), got):
        torch.testing.assert_close((p - 0.1 * g).detach(), reference[name], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="truncate=1 must be an int in 0..steps=0"):
        module.adapt(support, steps=0, create_graph=True)

