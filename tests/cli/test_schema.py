"""The schema's checks are derived from the typed options: InnerOptions' fields and each ``_target_``'s constructor hints.

A learner's option (``module.msl_anneal_steps``), a model's (``model.eval_stats``) and an inner-loop option
(``inner.steps``) are refused by the command line with the message their Python constructor gives, before any
file is written, and a new typed field reaches the command line with no edit of :mod:`metaloop.cli.schema`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
from cli_helpers import TINY, cli_error

from metaloop.algorithms import MAMLPlusPlus, MetaLightningModule, ReptileModule
from metaloop.algorithms.options import InnerOptions
from metaloop.cli import schema
from metaloop.typed import AtLeast, Hint, Key, constructors, keys_of

MAMLPP = ["--config", "mamlpp_omniglot.yaml", *TINY]


def _refused(tmp_path: Path, *args: str) -> str:
    """Returns the one-line error of ``metaloop fit ARGS``, after checking that no run or sweep folder was written."""
    message = cli_error("fit", *args, f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert len(message.splitlines()) == 1, message
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists() and not Path("outputs").exists()
    return message


@pytest.mark.parametrize("override,expected", [
    ("module.msl_anneal_steps=-1", "module.msl_anneal_steps=-1 is not accepted (it is below 0); use a whole number >= 0 "
     "(meta-steps over which the multi-step loss anneals to the last step; 0: the last step's loss only)"),
    ("module.lslr=maybe", "module.lslr='maybe' is not accepted (not a boolean); use true or false"),
    ("model.eval_stats=transductive", "model.eval_stats='transductive' is not accepted (not one of the choices); use one of running, batch"),
    ("model.steps=0", "model.steps=0 is not accepted (it is below 1)"),
])
def test_a_learners_and_a_models_option_is_refused_by_its_hint(override, expected, tmp_path):
    assert expected in _refused(tmp_path, *MAMLPP, override)


def test_reptiles_own_option_is_refused_by_its_hint(tmp_path):
    message = _refused(tmp_path, "--config", "reptile_sinusoid.yaml", *TINY, "module.inner_batch=0")
    assert "module.inner_batch=0 is not accepted (it is below 1); use a whole number >= 1 (or null)" in message


def test_a_typo_in_a_learners_option_is_not_an_argument(tmp_path):
    """MAML++ takes **kwargs on to MetaLightningModule: the arguments along its bases are what it accepts."""
    message = _refused(tmp_path, *MAMLPP, "+module.msl_anealing=3")
    assert "module.msl_anealing is not an argument of metaloop.algorithms.MAMLPlusPlus (it takes: " in message
    assert "msl_anneal_steps" in message and "inner_optim" in message  # its own options and its base's
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("# MAML++ with a typo\ndefaults:\n  - mamlpp_omniglot\n  - _self_\nmodule:\n  msl_anealing: 3\n")
    message = _refused(tmp_path, "--config", str(recipe), *TINY)
    assert f"{recipe}:6: module.msl_anealing is not an argument of metaloop.algorithms.MAMLPlusPlus" in message


def test_inner_steps_is_refused_with_the_message_of_inner_options(tmp_path):
    """One key, one message: the command line's and InnerOptions(steps=-1)'s come from the same Key."""
    with pytest.raises(ValueError) as python:
        InnerOptions(steps=-1, eval_steps=1)
    message = _refused(tmp_path, *MAMLPP, "inner.steps=-1")
    assert f"inner.{python.value}" in message
    assert schema.typed_keys({})["inner.steps"] == keys_of(InnerOptions)["steps"]


def test_a_bad_learner_option_in_a_sweep_is_refused_before_the_first_job(tmp_path):
    message = _refused(tmp_path, "-m", *MAMLPP, "module.msl_anneal_steps=10,-5")
    assert "module.msl_anneal_steps=-5 is not accepted (it is below 0)" in message and "[sweep job" in message
    # a sweep over learners checks each job against its own learner's arguments
    message = _refused(tmp_path, "-m", "--config", "maml_sinusoid.yaml", *TINY, "module=maml,reptile", "+module.inner_batch=0")
    assert "module.inner_batch is not an argument of metaloop.algorithms.MetaLightningModule" in message


def test_inner_lr_may_not_be_null_where_the_inner_optimizer_reads_it(tmp_path):
    """InnerOptions(lr=None) keeps the optimizer's rate, but inner_optim.lr: ${inner.lr} passes it to torch.optim.SGD."""
    message = _refused(tmp_path, *MAMLPP, "inner.lr=null")
    assert "inner.lr is null; use a finite number" in message and "inner_optim.lr reads it and does not accept null" in message


def test_keys_of_a_learner_with_kwargs_walks_its_bases():
    keys = keys_of(MAMLPlusPlus, "module.")
    assert keys["module.msl_anneal_steps"] == Key(
        "int", minimum=0, hint="meta-steps over which the multi-step loss anneals to the last step; 0: the last step's loss only"
    )
    assert keys["module.lslr"] == Key("bool")
    assert keys["module.memory_format"].choices == ("auto", "channels_last", "contiguous")  # from MetaLearner, two bases up
    assert keys["module.inner.steps"] == keys_of(InnerOptions, "inner.")["inner.steps"]
    assert "module.inner_batch" not in keys and keys_of(ReptileModule)["inner_batch"].minimum == 1
    assert [f.__qualname__ for f in constructors(MAMLPlusPlus)] == [
        "MAMLPlusPlus.__init__", "MetaLightningModule.__init__", "MetaLearner.__init__"
    ]
    assert schema._arguments("metaloop.algorithms.MAMLPlusPlus")[1] is False  # no **kwargs left at the end of the chain
    assert set(keys_of(MetaLightningModule)) < set(keys_of(MAMLPlusPlus))


def test_a_new_inner_option_is_checked_with_no_schema_edit(monkeypatch):
    """A field added to InnerOptions (here a subclass with one more) is typed on the command line with no edit of the schema."""

    @dataclass(frozen=True)
    class WithWarmup(InnerOptions):
        warmup: Annotated[int, AtLeast(0), Hint("inner steps before the learned rates apply")] = 0
        schedule: Literal["constant", "cosine"] = "constant"
        implicit: Any = field(default=None)  # keeps InnerOptions' nested keys out of this example

    monkeypatch.setattr("metaloop.algorithms.options.InnerOptions", WithWarmup)
    keys = schema.typed_keys({})
    assert keys["inner.warmup"] == Key("int", minimum=0, hint="inner steps before the learned rates apply")
    cfg = {"inner": {"steps": 1, "warmup": -2, "schedule": "linear"}}
    with pytest.raises(schema.ConfigError) as refused:
        schema.check_config(cfg, {"inner": {"steps": 1, "warmup": 0, "schedule": "constant"}})
    assert str(refused.value) == (
        "inner.warmup=-2 is not accepted (it is below 0); use a whole number >= 0 (inner steps before the learned rates apply); "
        "inner.schedule='linear' is not accepted (not one of the choices); use one of constant, cosine"
    )
    assert dataclasses.is_dataclass(WithWarmup)


def test_foreign_hints_are_never_read_stricter_than_they_are():
    """Lightning's `bool | Literal["warn"]` and MLflow's `Literal[True, False, "all"]` type nothing: legit values pass."""
    assert Key.of(bool | Literal["warn"]) is None
    assert Key.of(Literal[True, False, "all"]) is None
    assert Key.of(int | float) is None
    assert schema.typed_keys({"logger": {"_target_": "lightning.pytorch.loggers.CSVLogger"}})["logger.flush_logs_every_n_steps"].kind == "int"
