"""metaloop.lightning.targets: a stored configuration builds only what metaloop's configs can name, checked before any call."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest
import torch
import yaml

from metaloop.lightning import targets
from metaloop.lightning.targets import ALLOW_ENV, TargetNotAllowed, allowed_targets, build, check_targets

REPO = Path(__file__).resolve().parents[2]


class UserNet(torch.nn.Module):
    """A model of the user's own, outside metaloop: built only when allowed."""

    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, width)


USER_NET = f"{UserNet.__module__}.UserNet"


def _targets(value, key=""):
    """Yields (key, target) for every ``_target_`` in a parsed YAML file (``hydra.utils.get_class``'s path too)."""
    if isinstance(value, dict):
        if isinstance(value.get("_target_"), str):
            yield key, value["_target_"]
            if value["_target_"] == "hydra.utils.get_class":
                yield key, value["path"]
        for name, item in value.items():
            yield from _targets(item, f"{key}.{name}")
    elif isinstance(value, list):
        for item in value:
            yield from _targets(item, key)


def test_every_target_in_the_shipped_configs_and_recipes_is_allowed():
    files = sorted((REPO / "configs").rglob("*.yaml")) + sorted((REPO / "recipes").rglob("*.yaml"))
    named = {(f"{path.relative_to(REPO)}:{key}", target) for path in files for key, target in _targets(yaml.safe_load(path.read_text()))}
    named = {(where, target) for where, target in named if "${" not in target}  # task=custom's ${task.source}: the user's
    assert len(named) > 50
    refused = sorted(f"{where} {target}" for where, target in named if target not in allowed_targets())
    assert refused == []
    for where, target in named:  # and through the check itself
        node = {"_target_": target, "path": "metaloop.nn.KroneckerLinear"} if target == "hydra.utils.get_class" else {"_target_": target}
        check_targets(node, source=where)


@pytest.mark.parametrize(
    ("node", "key", "target"),
    [
        ({"_target_": "torch.hub.load_state_dict_from_url", "url": "http://127.0.0.1:9/x.pt"}, "module._target_", "torch.hub.load_state_dict_from_url"),
        ({"_target_": "builtins.open", "file": "/tmp/x", "mode": "w"}, "module._target_", "builtins.open"),
        ({"_target_": "numpy.load", "file": "x.npy", "allow_pickle": True}, "module._target_", "numpy.load"),
        # a metaloop or torch module attribute that is not metaloop's or torch's class: matched exactly, not by prefix
        ({"_target_": "metaloop.lightning.checkpoint.torch.hub.load_state_dict_from_url"}, "module._target_", "metaloop.lightning.checkpoint.torch.hub.load_state_dict_from_url"),
        ({"_target_": "torch.nn.modules.module.torch.hub.load_state_dict_from_url"}, "module._target_", "torch.nn.modules.module.torch.hub.load_state_dict_from_url"),
        ({"_target_": "metaloop.cli.main", "argv": ["fit"]}, "module._target_", "metaloop.cli.main"),
        ({"_target_": "metaloop.lightning.checkpoint.download", "url": "http://127.0.0.1:9/x", "target": "/tmp/x"}, "module._target_", "metaloop.lightning.checkpoint.download"),
        # nested, in _args_, under a partial, behind get_class and functools.partial
        ({"_target_": "metaloop.lightning.MetaLightningModule", "model": {"_target_": "torch.nn.Sequential", "_args_": [{"_target_": "builtins.exec", "_args_": ["print(1)"]}]}},
         "module.model._args_[0]._target_", "builtins.exec"),
        ({"_target_": "torch.optim.SGD", "_partial_": True, "lr": {"_target_": "builtins.eval", "_args_": ["1"]}}, "module.lr._target_", "builtins.eval"),
        ({"_target_": "hydra.utils.get_class", "path": "subprocess.Popen"}, "module.path", "subprocess.Popen"),
        ({"_target_": "functools.partial", "_args_": [{"_target_": "hydra.utils.get_method", "path": "os.system"}]}, "module._args_[0]._target_", "hydra.utils.get_method"),
        ({"_target_": "metaloop.lightning.MLP", "sizes": [[{"_target_": "os.system", "_args_": ["true"]}]]}, "module.sizes[0][0]._target_", "os.system"),
    ],
)
def test_a_target_that_is_not_allowed_is_refused_in_one_line_naming_it_its_key_and_how_to_allow_it(node, key, target, monkeypatch):
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    with pytest.raises(TargetNotAllowed) as refused:
        build(node, source="checkpoint run.ckpt", key="module")
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"checkpoint run.ckpt names the target {target!r} at {key},")
    assert f"allow=[{target!r}]" in message and f"{ALLOW_ENV}={target}" in message


def test_an_interpolation_is_refused_before_any_resolver_runs(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    node = {"_target_": "metaloop.lightning.MLP", "sizes": f"${{oc.create:{{_target_:'builtins.open',file:'{victim}',mode:'w'}}}}"}
    with pytest.raises(TargetNotAllowed, match=r"holds the interpolation .*oc.create.* at module.sizes; metaloop stores resolved"):
        build(node, key="module")
    assert victim.read_text() == "keep"


def test_what_the_user_allows_is_built_by_exact_name_or_package_prefix(monkeypatch):
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    node = {"_target_": USER_NET, "width": 4}
    with pytest.raises(TargetNotAllowed, match=f"names the target '{USER_NET}'"):
        build(node)
    assert build(node, allow=[USER_NET]).layer.out_features == 4
    package = UserNet.__module__.rpartition(".")[0] or UserNet.__module__
    assert isinstance(build(node, allow=[f"{package}."]), UserNet)
    monkeypatch.setenv(ALLOW_ENV, f" other.Thing , {USER_NET}")
    assert isinstance(build(node), UserNet)


def test_a_package_prefix_allows_what_the_package_defines_not_what_it_imports(monkeypatch):
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    module = UserNet.__module__  # it imports torch: torch.hub is reachable through it
    with pytest.raises(TargetNotAllowed, match=f"names the target '{module}.torch.hub.load_state_dict_from_url'"):
        check_targets({"_target_": f"{module}.torch.hub.load_state_dict_from_url"}, allow=[f"{module}."])
    with pytest.raises(TargetNotAllowed, match="cannot be imported"):
        check_targets({"_target_": f"{module}.Absent"}, allow=[f"{module}."])
    # torch's class reached through the user's package is torch's class: allowed
    check_targets({"_target_": f"{module}.torch.nn.Linear"}, allow=[f"{module}."])


def test_metaloop_torch_nn_and_optim_classes_and_partials_of_them_build():
    assert isinstance(build({"_target_": "metaloop.lightning.MLP", "sizes": [1, 2, 1]}), torch.nn.Module)
    assert isinstance(build({"_target_": "torch.nn.modules.linear.Linear", "in_features": 1, "out_features": 1}), torch.nn.Linear)
    make = build({"_target_": "functools.partial", "_args_": [{"_target_": "hydra.utils.get_class", "path": "torch.optim.SGD"}], "lr": 0.1})
    assert isinstance(make([torch.zeros(1, requires_grad=True)]), torch.optim.SGD)
    assert "torch.optim.lr_scheduler.CosineAnnealingLR" in allowed_targets()


def test_the_docstring_example_runs():
    assert doctest.testmod(targets, raise_on_error=True).attempted == 1


@pytest.mark.parametrize("name, kwargs", [
    ("Conv4", {"out_features": 2, "hidden": 4}),
    ("MLP", {"sizes": [1, 4, 1]}),
    ("ContextMLP", {"sizes": [1, 4, 1], "context_size": 2}),
    ("FiLMConv4", {"out_features": 2, "hidden": 4, "context_size": 3}),
    ("conv4_backbone", {"hidden": 4}),
])
def test_configurations_stored_before_the_networks_moved_to_metaloop_nn_still_build(name, kwargs):
    """Checkpoints written before the move name metaloop.lightning.<network>: they build metaloop.nn's network, with its parameter names."""
    import metaloop.lightning
    import metaloop.nn

    assert getattr(metaloop.lightning, name) is getattr(metaloop.nn, name)
    old, new = build({"_target_": f"metaloop.lightning.{name}", **kwargs}), build({"_target_": f"metaloop.nn.{name}", **kwargs})
    assert type(old) is type(new) and list(old.state_dict()) == list(new.state_dict())
