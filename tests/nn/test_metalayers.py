"""MetaModule substitutes submodules by type; ParameterTransform runs a module on transformed weights without changing them."""

from __future__ import annotations

import torch
from torch import nn

from metaloop.nn import MetaModule, ParameterTransform, Scale


def test_parameter_transform_runs_the_module_on_transformed_parameters():
    torch.manual_seed(0)
    linear = nn.Linear(3, 2)
    wrapped = ParameterTransform(linear, lambda p: Scale(p.shape, alpha=2.0))
    x = torch.randn(4, 3)
    torch.testing.assert_close(wrapped(x), x @ (2 * linear.weight).t() + 2 * linear.bias, rtol=0, atol=1e-6)
    assert len(list(wrapped.meta_parameters())) == 2
    wrapped(x).sum().backward()
    alpha_w = wrapped.parameter_transforms["weight"].alpha
    torch.testing.assert_close(alpha_w.grad, torch.ones(2, 1) @ x.sum(0, keepdim=True) * linear.weight.detach(), rtol=0, atol=1e-5)
    assert linear._parameters["weight"] is linear.weight and isinstance(linear.weight, nn.Parameter)


def test_parameter_transform_accepts_functions_and_nested_names():
    block = nn.Sequential(nn.Linear(2, 2))
    wrapped = ParameterTransform(block, lambda p: (lambda t: t * 0))
    assert set(wrapped.parameter_transforms) == {"0-weight", "0-bias"}
    assert torch.equal(wrapped(torch.randn(3, 2)), torch.zeros(3, 2))


def test_meta_module_substitutes_freezes_and_unwraps():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    originals = [model[0], model[2]]
    meta = MetaModule(model, {nn.Linear: lambda lin: ParameterTransform(lin, lambda p: Scale(p.shape, alpha=1.0))})
    assert all(isinstance(meta.wrapped_module[i], ParameterTransform) for i in (0, 2))
    assert not any(p.requires_grad for lin in originals for p in lin.parameters())
    assert len(list(meta.meta_parameters())) == 4
    x = torch.randn(5, 4)
    torch.testing.assert_close(meta(x), originals[1](torch.relu(originals[0](x))), rtol=0, atol=0)  # alpha = 1
    unwrapped = meta.module()
    assert unwrapped[0] is originals[0] and unwrapped[2] is originals[1]


def test_meta_module_can_keep_the_original_trainable_and_add_layers():
    model = nn.Sequential(nn.Linear(4, 3))
    meta = MetaModule(
        model,
        {nn.Linear: lambda lin: nn.Sequential(lin, nn.Linear(lin.out_features, lin.out_features))},
        freeze_module=False,
    )
    assert meta(torch.randn(2, 4)).shape == (2, 3)
    assert all(p.requires_grad for p in meta.parameters())
    assert list(meta.meta_parameters()) == []
