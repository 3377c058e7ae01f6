"""Stateless modules: fast weights, their history, buffers, submodules, awkward architectures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import metaloop
from metaloop.patch import FunctionalModule


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x))).mean((2, 3))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.head = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def embed(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.encoder(x) * scale


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(5, 1, 6, 6, generator=torch.Generator().manual_seed(1))


def shifted(params, amount=0.5):
    return [p + amount for p in params]


def test_forward_matches_module_and_uses_given_params(net, images):
    fmodel = metaloop.monkeypatch(net)
    net.eval(), fmodel.eval()
    torch.testing.assert_close(fmodel(images), net(images))
    new = shifted(fmodel.parameters())
    out = fmodel(images, params=new)
    with torch.no_grad():
        for p, q in zip(net.parameters(), new):
            p.copy_(q)
    torch.testing.assert_close(out, net(images))


def test_history_and_initial_weights(net, images):
    fmodel = metaloop.monkeypatch(net)
    assert isinstance(fmodel, FunctionalModule) and isinstance(fmodel, nn.Module)
    p0 = list(fmodel.parameters())
    assert fmodel.init_fast_params == p0 == fmodel.fast_params
    # copy_initial_weights=True: detached copies, no gradient to the module.
    assert all(a is not b and a.grad_fn is None and torch.equal(a, b) for a, b in zip(p0, net.parameters()))
    p1 = shifted(p0)
    fmodel.update_params(p1)
    p2 = shifted(p1)
    fmodel(images, params=p2)  # passing params records them, as in higher
    assert list(fmodel.parameters(time=0)) == p0
    assert list(fmodel.parameters(time=1)) == p1
    assert list(fmodel.parameters()) == p2 == fmodel.fast_params
    fmodel(images, params=p2)
    assert len(fmodel._fast_params) == 3  # the same weights again are not recorded twice
    with pytest.raises(ValueError, match=r"only times 0..2 are recorded"):
        fmodel.parameters(time=5)


def test_copy_initial_weights_false_reaches_the_module(net, images):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with metaloop.innerloop_ctx(net, opt, copy_initial_weights=False) as (fmodel, diffopt):
        assert all(a is b for a, b in zip(fmodel.parameters(time=0), net.parameters()))
        diffopt.step(fmodel(images).pow(2).sum())
        fmodel(images).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    net.zero_grad()
    with metaloop.innerloop_ctx(net, opt) as (fmodel, diffopt):
        diffopt.step(fmodel(images).pow(2).sum())
        fmodel(images).pow(2).sum().backward()
    assert all(p.grad is None for p in net.parameters())


def test_submodules_and_methods_use_fast_weights(net, images):
    fmodel = metaloop.monkeypatch(net)
    fmodel.update_params(shifted(fmodel.parameters()))
    features = fmodel.encoder(images)
    torch.testing.assert_close(fmodel.head(features), fmodel(images))
    torch.testing.assert_close(fmodel.embed(images, scale=2.0), 2 * features)
    names = [n for n, _ in net.named_parameters()]
    assert fmodel.head[2].weight is fmodel.fast_params[names.index("head.2.weight")]
    assert fmodel.encoder.conv.bias is fmodel.fast_params[names.index("encoder.conv.bias")]
    assert list(fmodel.head.parameters()) == fmodel.fast_params[-4:]
    assert fmodel.head[0].in_features == 3
    with torch.no_grad():
        assert not torch.allclose(net.encoder(images), features)


def test_batchnorm_buffers_evolve_in_the_functional_module_only(net, images):
    net.train()
    fmodel = metaloop.monkeypatch(net)
    original = net.encoder.bn.running_mean.clone()
    fmodel(images)
    assert torch.equal(net.encoder.bn.running_mean, original)
    assert not torch.equal(fmodel.encoder.bn.running_mean, original)
    assert int(fmodel.encoder.bn.num_batches_tracked) == 1 and int(net.encoder.bn.num_batches_tracked) == 0
    metaloop.buffer_sync(net, fmodel)
    assert torch.equal(fmodel.encoder.bn.running_mean, original)
    assert fmodel.encoder.bn.running_mean is not net.encoder.bn.running_mean
    with pytest.raises(TypeError, match="expects a FunctionalModule"):
        metaloop.buffer_sync(net, net)


def test_train_eval_mode_is_the_functional_modules_own(net, images):
    net.train()
    fmodel = metaloop.monkeypatch(net)
    fmodel.eval()
    out = fmodel(images)
    assert net.training and all(m.training for m in net.modules())
    net.eval()
    torch.testing.assert_close(out, net(images))  # eval used the running stats
    fmodel.train()
    fmodel(images)
    assert not net.training


def test_tied_weights_appear_once_and_get_both_contributions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Tanh(), nn.Linear(3, 3, bias=False))
    model[2].weight = model[0].weight
    fmodel = metaloop.monkeypatch(model)
    assert len(fmodel.fast_params) == 1
    x = torch.randn(4, 3)
    torch.testing.assert_close(fmodel(x), model(x))
    (w,) = fmodel.fast_params
    out = fmodel(x).sum()
    (grad,) = torch.autograd.grad(out, w)
    model(x).sum().backward()
    torch.testing.assert_close(grad, model[0].weight.grad)
    assert fmodel[2].weight is w and fmodel[0].weight is w


def test_make_functional_needs_params(net, images):
    fmodel = metaloop.make_functional(net)
    assert fmodel.fast_params is None
    with pytest.raises(ValueError, match="params= must be given"):
        fmodel(images)
    params = metaloop.utils.get_func_params(net)
    torch.testing.assert_close(fmodel(images, params=params), net(images))
    with pytest.raises(ValueError, match=r"expected 8 fast weights .* got 1"):
        fmodel(images, params=params[:1])
    with pytest.raises(ValueError, match=r"'encoder.conv.weight' has shape \(1,\), expected \(3, 1, 3, 3\)"):
        fmodel(images, params=[torch.zeros(1)] + params[1:])
    with pytest.raises(TypeError, match="expects an nn.Module"):
        metaloop.make_functional(lambda x: x)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_recurrent_flat_weights_second_order(kind):
    torch.manual_seed(0)
    rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(3, 4, num_layers=2, batch_first=True).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    opt = torch.optim.SGD(rnn.parameters(), lr=0.1)
    with metaloop.innerloop_ctx(rnn, opt, copy_initial_weights=False) as (fmodel, diffopt):
        torch.testing.assert_close(fmodel(x)[0], rnn(x)[0])
        diffopt.step(fmodel(x)[0].pow(2).sum())
        loss = fmodel(x)[0].pow(2).sum()
        grads = torch.autograd.grad(loss, list(rnn.parameters()))
    assert len(grads) == len(list(rnn.parameters())) and all(torch.isfinite(g).all() for g in grads)
    # Other fast weights really are used (the flat-weight cache follows them), and the
    # original module's weights are untouched.
    original = [p.detach().clone() for p in rnn.parameters()]
    fmodel = metaloop.monkeypatch(rnn)
    shifted_out = fmodel(x, params=[p + 0.5 for p in fmodel.parameters()])[0]
    for p, q in zip(rnn.parameters(), original):
        assert torch.equal(p, q)
    with torch.no_grad():
        for p in rnn.parameters():
            p.add_(0.5)
    torch.testing.assert_close(shifted_out, rnn(x)[0])


def test_attention_and_transformer_layers_second_order():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 5, 8)
    for module, run in [(layer, lambda m: m(x)), (mha, lambda m: m(x, x, x)[0])]:
        opt = torch.optim.Adam(module.parameters(), lr=0.01)
        with metaloop.innerloop_ctx(module, opt, copy_initial_weights=False) as (fmodel, diffopt):
            torch.testing.assert_close(run(fmodel), run(module))
            diffopt.step(run(fmodel).pow(2).mean())
            grads = torch.autograd.grad(run(fmodel).pow(2).mean(), list(module.parameters()))
        assert all(torch.isfinite(g).all() for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0


def test_frozen_parameters_keep_requires_grad_false(net, images):
    net.encoder.conv.weight.requires_grad_(False)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    with metaloop.innerloop_ctx(net, opt) as (fmodel, diffopt):
        assert not fmodel.fast_params[0].requires_grad
        new = diffopt.step(fmodel(images).sum())
        assert new[0] is fmodel.init_fast_params[0]


def test_device_argument_casts_weights_and_buffers(net):
    fmodel = metaloop.monkeypatch(net, device="cpu")
    assert all(p.device.type == "cpu" for p in fmodel.parameters())
    assert all(b.device.type == "cpu" for b in fmodel.buffers())
    assert all(a is not b for a, b in zip(fmodel.buffers(), net.buffers()))


def test_track_higher_grads_flag(net):
    fmodel = metaloop.monkeypatch(net, track_higher_grads=False)
    assert fmodel.track_higher_grads is False
    with pytest.raises(RuntimeError, match="init_fast_params is unavailable"):
        fmodel.init_fast_params
    fmodel.update_params(shifted(fmodel.parameters()))
    assert len(fmodel._fast_params) == 1
    with pytest.raises(ValueError, match="must be a bool"):
        fmodel.track_higher_grads = 1


def test_highers_patch_names_hold_for_functional_modules():
    """higher.patch._MonkeyPatchBase and _internal_attrs; isinstance(fmodel, type(model)) as in higher."""
    from metaloop.patch import _internal_attrs, _MonkeyPatchBase

    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh())
    fmodel = metaloop.monkeypatch(model)
    assert isinstance(fmodel, _MonkeyPatchBase) and isinstance(fmodel, metaloop.FunctionalModule)
    assert isinstance(fmodel, torch.nn.Sequential) and not isinstance(fmodel, torch.nn.Linear)
    assert type(fmodel) is metaloop.FunctionalModule  # only isinstance sees the combined class
    assert isinstance(metaloop.monkeypatch(torch.nn.Linear(2, 2)), torch.nn.Linear)
    assert {"_parameters", "_buffers", "_modules", "_forward_hooks"} <= _internal_attrs
    assert all(hasattr(model, name) for name in _internal_attrs - {"_backend"})
