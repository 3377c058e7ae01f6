"""Evaluations you can trust (issue 19, B8-B10 and D): a non-finite figure fails the run, the reported validation
is of the final weights, evaluations keep their own records, and a non-finite number is refused before any file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_helpers import TINY, cli, cli_error

SINE = ["--config", "maml_sinusoid.yaml", *TINY]
SMALL_EVAL = ["task.num_val_tasks=4", "task.num_test_tasks=4", "task.eval_meta_batch_size=4"]
# finite training (one inner step at lr 0.5: train/loss ~135), an evaluation inner loop of 200 such steps: NaN
DIVERGING_EVALUATION = ["inner.lr=0.5", "inner.eval_steps=200"]


def _strict(text: str) -> dict:
    """Returns the JSON ``text`` parsed strictly: NaN or Infinity in it fail the test."""
    def refuse(constant: str) -> None:
        pytest.fail(f"{constant} in a record that must be strict JSON")

    return json.loads(text, parse_constant=refuse)


# -- B8: a non-finite evaluation is a failure, with its cause -------------------------------------
@pytest.mark.parametrize("without", [[], ["~callbacks.finite"]], ids=["callback", "without-callback"])
def test_a_diverging_evaluation_fails_in_one_line_naming_stage_metric_and_cause(without, tmp_path):
    run = tmp_path / "run"
    message = cli_error("fit", *SINE, *DIVERGING_EVALUATION, *without, f"hydra.run.dir={run}")
    assert len(message.splitlines()) == 1
    assert "the validation of meta-step 2 is not finite (val/loss_post=nan)" in message
    assert "inner.lr=0.5" in message and "inner.eval_steps=200" in message
    # no figures are reported: no results.json beside the failed run
    assert not (run / "results.json").exists()
    # the finite weights trained before the evaluation are kept
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())


def test_records_are_strict_json_with_undefined_numbers_as_null(tmp_path):
    from metaloop.cli.report import write_evaluation, write_results

    metrics = {"val/loss_post": 0.5, "val/loss_post_ci95": float("nan"), "test/loss_post": 0.25}
    record = _strict(write_results(metrics, 3, {"fit": 1.0}, tmp_path, float("nan"), 3).read_text())
    assert record["metrics"] == {"val/loss_post": 0.5, "val/loss_post_ci95": None, "test/loss_post": 0.25}
    assert record["meta_steps_per_s"] is None and record["validation_step"] == 3
    evaluation = _strict(write_evaluation("test", metrics, "a.ckpt", 7, {"test": 1.0}, tmp_path).read_text())
    assert evaluation["metrics"]["val/loss_post_ci95"] is None and evaluation["checkpoint_step"] == 7


# -- B9: the reported validation is of the final weights ------------------------------------------
def test_the_reported_validation_is_of_the_final_weights(tmp_path):
    run = tmp_path / "run"
    cli("fit", *SINE, *SMALL_EVAL, "trainer.max_steps=12", "trainer.val_check_interval=5", f"hydra.run.dir={run}")
    fitted = _strict((run / "results.json").read_text())
    assert fitted["global_step"] == fitted["validation_step"] == 12
    cli("validate", *SINE, *SMALL_EVAL, f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={tmp_path / 'check'}")
    (record,) = (tmp_path / "check" / "evaluations").glob("validate-*.json")
    validated = _strict(record.read_text())
    assert validated["checkpoint_step"] == 12
    for key in ("val/loss_pre", "val/loss_post"):
        assert fitted["metrics"][key] == pytest.approx(validated["metrics"][key], rel=1e-6)


def test_a_run_stopped_by_max_time_reports_the_validation_of_its_last_step(tmp_path):
    run = tmp_path / "run"
    cli("fit", *SINE, *SMALL_EVAL, "trainer.max_steps=1000000", "trainer.val_check_interval=1000000",
        "trainer.max_time=00:00:00:02", f"hydra.run.dir={run}")
    fitted = _strict((run / "results.json").read_text())
    assert 0 < fitted["global_step"] < 1000000
    assert fitted["validation_step"] == fitted["global_step"]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == fitted["global_step"]


# -- B10: evaluations write their own records --------------------------------------------------------
def test_evaluations_in_a_run_folder_keep_the_fits_results_and_record_their_checkpoint(tmp_path):
    run = tmp_path / "run"
    cli("fit", *SINE, *SMALL_EVAL, f"hydra.run.dir={run}")
    fit_record = (run / "results.json").read_bytes()
    fitted = _strict(fit_record.decode())
    for command in ("test", "validate", "test"):
        cli(command, *SINE, *SMALL_EVAL, "ckpt_path=last", f"hydra.run.dir={run}")
    assert (run / "results.json").read_bytes() == fit_record
    tests = sorted((run / "evaluations").glob("test-*.json"))
    assert len(tests) == 2 and len(list((run / "evaluations").glob("validate-*.json"))) == 1
    for path in tests:
        record = _strict(path.read_text())
        assert record["command"] == "test"
        assert record["checkpoint"] == str(run / "checkpoints" / "last.ckpt") and record["checkpoint_step"] == 2
        assert record["metrics"]["test/loss_post"] == pytest.approx(fitted["metrics"]["test/loss_post"], rel=1e-6)


# -- D: a non-finite number is refused before any file ----------------------------------------------
@pytest.mark.parametrize("override", ["inner.lr=nan", "inner.lr=inf", "outer_optim.lr=-inf", "inner.implicit.tol=nan"])
def test_a_non_finite_number_is_refused_in_one_line_before_any_file(override, tmp_path):
    message = cli_error("fit", *SINE, override, f"hydra.run.dir={tmp_path / 'run'}")
    key = override.split("=")[0]
    assert f"{key}=" in message and "is not accepted (not a finite number)" in message
    assert len(message.splitlines()) == 1
    assert not (tmp_path / "run").exists() and not Path("outputs").exists()


def test_a_non_finite_number_in_a_sweep_is_refused_before_the_first_job(tmp_path):
    message = cli_error("fit", "-m", *SINE, "inner.lr=0.1,nan", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert "inner.lr=nan is not accepted (not a finite number)" in message
    assert not (tmp_path / "sweep").exists()
