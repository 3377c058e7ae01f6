"""``from metaloop.compat import learn2learn as l2l``: learn2learn's names, and its documented examples, run."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import metaloop.lightning
import metaloop.nn
import metaloop.optim
import metaloop.transforms
from metaloop.compat import learn2learn as l2l
from metaloop.compat.learn2learn.utils import lightning as l2l_lightning

F64 = torch.float64

NAMES = {
    "optim.LearnableOptimizer": metaloop.transforms.LearnableOptimizer,
    "optim.ParameterUpdate": metaloop.transforms.ParameterUpdate,
    "optim.DifferentiableSGD": metaloop.transforms.ModuleSGD,
    "optim.ModuleTransform": metaloop.transforms.ModuleTransform,
    "optim.ReshapedTransform": metaloop.transforms.ReshapedTransform,
    "optim.KroneckerTransform": metaloop.transforms.KroneckerTransform,
    "optim.MetaCurvatureTransform": metaloop.transforms.MetaCurvatureTransform,
    "optim.transforms.ModuleTransform": metaloop.transforms.ModuleTransform,
    "optim.transforms.KroneckerTransform": metaloop.transforms.KroneckerTransform,
    "optim.transforms.MetaCurvatureTransform": metaloop.transforms.MetaCurvatureTransform,
    "nn.KroneckerLinear": metaloop.nn.KroneckerLinear,
    "nn.KroneckerRNN": metaloop.nn.KroneckerRNN,
    "nn.KroneckerLSTM": metaloop.nn.KroneckerLSTM,
    "nn.KroneckerConv2d": metaloop.nn.KroneckerConv2d,
    "clone_module": metaloop.transforms.clone_module,
    "update_module": metaloop.transforms.update_module,
    "detach_module": metaloop.transforms.detach_module,
    "utils.clone_module": metaloop.transforms.clone_module,
    "utils.update_module": metaloop.transforms.update_module,
    "utils.detach_module": metaloop.transforms.detach_module,
    "nn.Lambda": metaloop.nn.Lambda,
    "nn.Flatten": metaloop.nn.Flatten,
    "nn.Scale": metaloop.nn.Scale,
    "nn.freeze": metaloop.nn.freeze,
    "nn.unfreeze": metaloop.nn.unfreeze,
    "nn.MetaModule": metaloop.nn.MetaModule,
    "nn.ParameterTransform": metaloop.nn.ParameterTransform,
    "nn.PrototypicalClassifier": metaloop.nn.PrototypicalClassifier,
    "nn.SVClassifier": metaloop.nn.SVClassifier,
    "nn.kroneckers.KroneckerLinear": metaloop.nn.KroneckerLinear,
    "nn.misc.Lambda": metaloop.nn.Lambda,
    "nn.protonet.PrototypicalClassifier": metaloop.nn.PrototypicalClassifier,
    "nn.metaoptnet.SVClassifier": metaloop.nn.SVClassifier,
    "nn.metalayers.MetaModule": metaloop.nn.MetaModule,
    "nn.metalayers.ParameterTransform": metaloop.nn.ParameterTransform,
    "nn.metalayers.metamodule.MetaModule": metaloop.nn.MetaModule,
    "nn.metalayers.parameter_transform.ParameterTransform": metaloop.nn.ParameterTransform,
    "clone_parameters": l2l.utils.clone_parameters,
    "clone_named_parameters": l2l.utils.clone_named_parameters,
    "clone_distribution": l2l.utils.clone_distribution,
    "detach_distribution": l2l.utils.detach_distribution,
    "magic_box": l2l.utils.magic_box,
    "accuracy": l2l.utils.accuracy,
    "flatten_config": l2l.utils.flatten_config,
    "algorithms.maml.MAML": l2l.algorithms.MAML,
    "algorithms.maml.maml_update": l2l.algorithms.maml_update,
    "algorithms.meta_sgd.MetaSGD": l2l.algorithms.MetaSGD,
    "algorithms.meta_sgd.meta_sgd_update": l2l.algorithms.meta_sgd_update,
    "algorithms.gbml.GBML": l2l.algorithms.GBML,
    "algorithms.base_learner.BaseLearner": l2l.algorithms.BaseLearner,
    "algorithms.lightning.LightningEpisodicModule": l2l.algorithms.LightningEpisodicModule,
    "algorithms.lightning.LightningMAML": l2l.algorithms.LightningMAML,
    "algorithms.lightning.LightningANIL": l2l.algorithms.LightningANIL,
    "algorithms.lightning.LightningPrototypicalNetworks": l2l.algorithms.LightningPrototypicalNetworks,
    "algorithms.lightning.LightningMetaOptNet": l2l.algorithms.LightningMetaOptNet,
}


def resolve(path: str) -> object:
    """Returns ``l2l.<path>`` (a dotted attribute path)."""
    obj = l2l
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("path, target", NAMES.items(), ids=NAMES.keys())
def test_learn2learn_names_resolve_to_metaloop(path, target):
    assert resolve(path) is target


@pytest.mark.parametrize("module", [
    "optim", "optim.transforms", "nn", "nn.kroneckers", "nn.misc", "nn.protonet", "nn.metaoptnet", "nn.metalayers",
    "nn.metalayers.metamodule", "nn.metalayers.parameter_transform", "utils", "algorithms", "algorithms.maml",
    "algorithms.meta_sgd", "algorithms.gbml", "algorithms.base_learner", "algorithms.lightning",
])
def test_submodules_import(module):
    assert importlib.import_module(f"metaloop.compat.learn2learn.{module}") is resolve(module)


def test_utils_lightning_is_a_submodule_with_the_episodic_batcher():
    assert importlib.import_module("metaloop.compat.learn2learn.utils.lightning") is l2l_lightning
    assert l2l_lightning.EpisodicBatcher.__module__ == "metaloop.compat.learn2learn.utils.lightning"


def test_the_lightning_heads_share_metaloops_head_code():
    """LightningPrototypicalNetworks / LightningMetaOptNet build metaloop.nn's heads and score with head_logits."""
    import metaloop.compat.learn2learn.algorithms.lightning.lightning_protonet as protonet

    assert protonet.head_logits is metaloop.lightning.head_logits
    assert isinstance(l2l.algorithms.LightningPrototypicalNetworks(nn.Flatten()).classifier, metaloop.nn.PrototypicalClassifier)
    assert isinstance(l2l.algorithms.LightningMetaOptNet(nn.Flatten()).classifier, metaloop.nn.SVClassifier)


def test_l2l_differentiable_sgd_is_not_highers():
    assert l2l.optim.DifferentiableSGD is not metaloop.optim.DifferentiableSGD
    assert issubclass(l2l.optim.DifferentiableSGD, nn.Module)


def test_learnable_optimizer_example():
    """learn2learn's LearnableOptimizer example (784x10 shrunk to 6x3): after metaopt.step(), the
    model's weights carry a graph to the transform, whose parameters get non-zero gradients."""
    torch.manual_seed(0)
    X, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    loss = nn.CrossEntropyLoss()
    linear = nn.Linear(6, 3)
    transform = l2l.optim.ModuleTransform(torch.nn.Linear)
    metaopt = l2l.optim.LearnableOptimizer(linear, transform, lr=0.01)
    opt = torch.optim.SGD(metaopt.parameters(), lr=0.001)
    for _ in range(3):
        metaopt.zero_grad()
        opt.zero_grad()
        error = loss(linear(X), y)
        error.backward()
        opt.step()  # update metaopt
        metaopt.step()  # update linear
    assert all(p.grad_fn is not None for p in linear.parameters())
    assert all(p.grad is not None and p.grad.abs().max() > 1e-6 for p in metaopt.parameters())


@pytest.mark.parametrize(
    "make_update",
    [
        lambda w: l2l.optim.KroneckerTransform(l2l.nn.KroneckerLinear)(w),
        lambda w: l2l.optim.MetaCurvatureTransform(w),
    ],
    ids=["kronecker", "metacurvature"],
)
def test_transform_examples_take_sgd_steps_at_initialisation(make_update):
    """The KroneckerTransform / MetaCurvatureTransform examples: the update equals the gradient (exact)."""
    torch.manual_seed(0)
    classifier = nn.Linear(784, 10, bias=False)
    X, y = torch.randn(4, 784), torch.randint(0, 10, (4,))
    update_fn = make_update(classifier.weight)
    nn.CrossEntropyLoss()(classifier(X), y).backward()
    update = update_fn(classifier.weight.grad)
    torch.testing.assert_close(update, classifier.weight.grad, rtol=0, atol=0)
    assert sum(p.numel() for p in update_fn.parameters()) == 784**2 + 10**2


def test_maml_style_adaptation_with_parameter_update():
    """clone_module + ParameterUpdate(create_graph) + update_module(-updates): a query loss backpropagates
    to the original model and to the transforms; identity transforms give one SGD step (1e-12)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    get_update = l2l.optim.ParameterUpdate(model, l2l.optim.KroneckerTransform(l2l.nn.KroneckerLinear))
    x, y = torch.randn(5, 3, dtype=F64), torch.randn(5, 2, dtype=F64)
    learner = l2l.clone_module(model)
    support = ((learner(x) - y) ** 2).mean()
    grads = torch.autograd.grad(support, list(learner.parameters()), retain_graph=True)
    updates = get_update(support, learner.parameters(), create_graph=True)
    l2l.update_module(learner, [-0.1 * u for u in updates])
    for p, q, g in zip(learner.parameters(), model.parameters(), grads):
        torch.testing.assert_close(p, q - 0.1 * g, rtol=0, atol=1e-12)
    ((learner(x) - y) ** 2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in model.parameters())
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in get_update.parameters())
    l2l.detach_module(learner)
    assert all(p.grad_fn is None for p in learner.parameters())
