"""Bad input to the differentiable optimizers gets a clear error naming the value."""

from __future__ import annotations

import pytest
import torch

import metaloop
from metaloop.optim import DifferentiableOptimizer, register_optim


@pytest.fixture
def model():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def test_unsupported_optimizer_lists_supported_and_register_optim(model):
    opt = torch.optim.LBFGS(model.parameters())
    with pytest.raises(ValueError, match=r"no differentiable version of LBFGS.*Adam.*SGD.*register_optim"):
        metaloop.optim.get_diff_optim(opt, model.parameters())


def test_sparse_optimizer_is_refused(model):
    opt = torch.optim.SparseAdam(model.parameters())
    with pytest.raises(ValueError, match="SparseAdam works on sparse gradients"):
        with metaloop.innerloop_ctx(model, opt):
            pass


def test_sparse_gradient_is_refused():
    emb = torch.nn.Embedding(5, 2, sparse=True)
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    with metaloop.innerloop_ctx(emb, opt) as (fmodel, diffopt):
        # functional_call still yields a dense gradient for a fast weight; force a sparse one.
        weight = fmodel.fast_params[0]
        loss = torch.nn.functional.embedding(torch.tensor([1, 2]), weight, sparse=True).sum()
        with pytest.raises(ValueError, match="sparse gradient"):
            diffopt.step(loss)


def test_step_without_params_or_fmodel(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    diffopt = metaloop.optim.get_diff_optim(opt, model.parameters())
    with pytest.raises(ValueError, match="step\\(\\) needs params="):
        diffopt.step(model(torch.randn(2, 3)).sum())


def test_params_of_wrong_length_or_shape(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    diffopt = metaloop.optim.get_diff_optim(opt, model.parameters())
    w, b = [p.detach().clone().requires_grad_() for p in model.parameters()]
    with pytest.raises(ValueError, match="got 1 fast weights but the optimizer was built for 2"):
        diffopt.step(w.sum(), params=[w])
    with pytest.raises(ValueError, match=r"fast weight 1 has shape \(3,\), expected \(2,\)"):
        diffopt.step(w.sum(), params=[w, torch.zeros(3, requires_grad=True)])
    with pytest.raises(TypeError, match="fast weight 0 must be a Tensor"):
        diffopt.step(w.sum(), params=[1.0, b])


def test_optimizer_over_foreign_parameters(model):
    other = torch.nn.Linear(5, 5)
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"parameter of shape \(5, 5\) that is not among reference_params"):
        metaloop.optim.get_diff_optim(opt, model.parameters())
    with pytest.raises(TypeError, match="expected a torch.optim.Optimizer"):
        metaloop.optim.get_diff_optim("sgd", model.parameters())


def test_register_optim_checks_types_and_accepts_higher_style_subclasses(model):
    class SignSGD(torch.optim.SGD):
        pass

    class DifferentiableSignSGD(DifferentiableOptimizer):
        """Written the higher way: override _update and write into param_groups."""

        def _update(self, grouped_grads, **kwargs):
            for group, grads in zip(self.param_groups, grouped_grads):
                for i, (p, g) in enumerate(zip(group["params"], grads)):
                    if g is not None:
                        group["params"][i] = p - group["lr"] * torch.sign(g)

    with pytest.raises(TypeError, match="optim_type must be a torch.optim.Optimizer subclass"):
        register_optim(int, DifferentiableSignSGD)
    with pytest.raises(TypeError, match="diff_optim_type must be a DifferentiableOptimizer subclass"):
        register_optim(SignSGD, int)
    with pytest.raises(ValueError, match="no differentiable version of SignSGD"):
        metaloop.optim.get_diff_optim(SignSGD(model.parameters(), lr=0.1), model.parameters())
    register_optim(SignSGD, DifferentiableSignSGD)
    with metaloop.innerloop_ctx(model, SignSGD(model.parameters(), lr=0.1)) as (fmodel, diffopt):
        assert isinstance(diffopt, DifferentiableSignSGD)
        x = torch.randn(4, 3)
        loss = fmodel(x).sum()
        grads = torch.autograd.grad(loss, list(fmodel.parameters()), retain_graph=True)
        diffopt.step(loss)
        for p0, p1, g in zip(fmodel.parameters(time=0), fmodel.parameters(), grads):
            torch.testing.assert_close(p1, p0 - 0.1 * torch.sign(g))
    with pytest.raises(TypeError, match="defines neither a rule nor _update"):
        DifferentiableOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.parameters()).step(
            model(torch.randn(1, 3)).sum(), params=list(model.parameters())
        )


def test_loss_without_graph_is_explained(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with metaloop.innerloop_ctx(model, opt) as (fmodel, diffopt):
        with torch.no_grad():
            loss = fmodel(torch.randn(2, 3)).sum()
        with pytest.raises(ValueError, match=r"has no graph \(was it computed under torch.no_grad\(\)\?\)"):
            diffopt.step(loss)


def test_get_rule_names_the_rule_or_explains():
    assert metaloop.optim.get_rule(torch.optim.AdamW) is metaloop.optim.OPTIMIZERS[torch.optim.Adam]
    assert metaloop.optim.get_rule(torch.optim.SGD) is metaloop.optim.OPTIMIZERS[torch.optim.SGD]
    with pytest.raises(ValueError, match="no differentiable version of LBFGS"):
        metaloop.optim.get_rule(torch.optim.LBFGS)


def test_unknown_constructor_option_names_it_and_the_accepted_ones(model):
    opt = torch.optim.Rprop(model.parameters(), lr=0.01)
    with pytest.raises(TypeError, match=r"DifferentiableRprop got unknown option\(s\) 'smoth_sign'; it accepts .*track_higher_grads, smooth_sign"):
        metaloop.optim.get_diff_optim(opt, model.parameters(), smoth_sign=0.1)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"DifferentiableSGD got unknown option\(s\) 'momentun'"):
        metaloop.optim.get_diff_optim(sgd, model.parameters(), momentun=0.9)
    metaloop.optim.get_diff_optim(opt, model.parameters(), smooth_sign=0.1)  # a rule option is accepted


def test_unknown_step_option_names_it_and_the_accepted_ones(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with metaloop.innerloop_ctx(model, opt) as (fmodel, diffopt):
        with pytest.raises(TypeError, match=r"step\(\) got unknown option\(s\) 'overide'; it accepts loss, params, override, grad_callback"):
            diffopt.step(fmodel(torch.randn(2, 3)).sum(), overide={"lr": [0.5]})


def test_rule_check_runs_where_hyperparameters_enter(model):
    opt = torch.optim.Rprop(model.parameters(), lr=0.01)
    with pytest.raises(ValueError, match=r"smooth_sign=-0.5 must be >= 0"):
        metaloop.optim.get_diff_optim(opt, model.parameters(), smooth_sign=-0.5)
    diffopt = metaloop.optim.get_diff_optim(opt, model.parameters(), smooth_sign=0.1)
    with pytest.raises(ValueError, match=r"smooth_sign=-1 must be >= 0"):
        diffopt._apply_override({"smooth_sign": [-1]})
