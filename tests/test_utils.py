"""higher's small helpers that users reach for: same names, same behaviour."""

from __future__ import annotations

import torch

import metaloop
from metaloop import utils
from metaloop.optim import _get_mask_closure, _maybe_mask


def test_flatten_and_recursive_map():
    nested = [1, (2, 3), {"a": [4, {5}], "b": 6}]
    assert utils.flatten(nested) == [1, 2, 3, 4, 5, 6]
    assert utils.flatten(7) == [7]
    doubled = utils._recursive_map(nested, lambda x: 2 * x)
    assert doubled == [2, (4, 6), {"a": [8, {10}], "b": 12}]
    assert isinstance(doubled[1], tuple)
    assert utils.unflatten_like([10, 20, 30, 40, 50, 60], nested) == [10, (20, 30), {"a": [40, {50}], "b": 60}]


def test_get_func_params_copies_and_keeps_requires_grad():
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    copies = utils.get_func_params(model)
    assert [c.requires_grad for c in copies] == [True, False]
    assert all(c.grad_fn is None and c is not p and torch.equal(c, p) for c, p in zip(copies, model.parameters()))
    shared = utils.get_func_params(model, safe_copy=False, device="cpu")
    assert shared[0].data_ptr() == model.weight.data_ptr()


def test_find_param_and_mapping_with_tied_weights():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[1].weight = model[0].weight
    seen: list = []
    assert utils._get_param_mapping(model, seen, []) == [0, 1, 0, 2]
    assert len(seen) == 3 and utils._find_param_in_list(model[1].bias, seen) == 2
    assert utils._find_param_in_list(torch.zeros(1), seen) is None


def test_mask_closure_zeroes_masked_gradients():
    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    mask = torch.tensor([True, False, True])
    _maybe_mask(x, mask)
    (x * torch.tensor([4.0, 5.0, 6.0])).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 5.0, 0.0]))
    torch.testing.assert_close(_get_mask_closure(mask)(torch.ones(3)), torch.tensor([0.0, 1.0, 0.0]))


def test_higher_names_are_exported():
    import metaloop.optim as optim

    for name in ["innerloop_ctx", "monkeypatch", "make_functional", "buffer_sync", "get_diff_optim",
                 "create_diff_optim", "register_optim", "optim", "patch", "utils"]:
        assert hasattr(metaloop, name), name
    for name in ["DifferentiableOptimizer", "DifferentiableSGD", "DifferentiableAdam", "DifferentiableAdamW",
                 "DifferentiableAdamax", "DifferentiableAdadelta", "DifferentiableAdagrad", "DifferentiableASGD",
                 "DifferentiableRMSprop", "DifferentiableRprop", "DifferentiableNAdam", "DifferentiableRAdam",
                 "get_trainable_opt_params", "apply_trainable_opt_params", "_get_mask_closure", "_maybe_mask"]:
        assert hasattr(optim, name), name
    assert metaloop.patch.monkeypatch is metaloop.monkeypatch
