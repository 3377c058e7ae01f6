"""Run and sweep folders that never mix two runs, resumes that continue the same experiment, evaluations of the model fitted.

Each test reproduces a failure of issue 19 (section B, and D's unusable run folder) through the ``metaloop`` command.
"""

from __future__ import annotations

import doctest
import fcntl
import json
import os
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path

import lightning
import pytest
import torch
import yaml
from cli_helpers import TINY, cli, cli_error, last_metrics

from metaloop.cli import stored_config
from metaloop.cli.folders import LOCK_NAME, lock_run_folder
from metaloop.cli.stored_config import experiment_changes, hydra_value, value_overrides
from metaloop.cli.sweep import RECORD
from metaloop.lightning import callbacks
from metaloop.lightning.runs import CONFIG_KEY

SINE = ["--config", "maml_sinusoid.yaml", *TINY]
SMALL_EVAL = ["task.num_val_tasks=4", "task.num_test_tasks=4", "task.eval_meta_batch_size=4"]


class LockProbe(lightning.Callback):
    """Records, at the first meta-step, whether another holder could lock the run folder (it must not)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_batch_end(self, trainer: lightning.Trainer, *args: object) -> None:
        with open(Path(self.folder) / LOCK_NAME, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held = True
            else:
                held = False
                fcntl.flock(handle, fcntl.LOCK_UN)
        (Path(self.folder) / "lock_probe.json").write_text(json.dumps({"held": held}))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LOCK_NAME}


def _step(checkpoint: Path) -> int:
    return torch.load(checkpoint, weights_only=True)["global_step"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A sinusoid run of 2 meta-steps fitted with non-default inner.lr, inner.eval_steps and task.k_shots: its folder."""
    run = tmp_path_factory.mktemp("fitted") / "run"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cli("fit", *SINE, *SMALL_EVAL, "inner.lr=0.1", "inner.eval_steps=5", "task.k_shots=5", f"hydra.run.dir={run}")
    return run


# -- B1. default run folders are new for each run, and held -------------------------------------
def test_two_fits_whose_timestamped_folder_is_the_same_get_a_folder_each_and_hold_it(tmp_path):
    # ${now:%Y} stands for the default's second: two fits started within it
    same = ["hydra.run.dir=outputs/x/${now:%Y}"]
    for seed in (0, 1):
        probe = ["+callbacks.probe._target_=test_trust_folders.LockProbe", "+callbacks.probe.folder=${hydra:runtime.output_dir}"]
        cli("fit", *SINE, *same, *probe, f"seed={seed}")
    first, second = sorted(Path("outputs/x").iterdir())
    assert second.name == first.name + "_1"
    for folder, seed in ((first, 0), (second, 1)):
        assert f"seed: {seed}" in (folder / ".hydra" / "config.yaml").read_text()
        assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]
        assert json.loads((folder / "lock_probe.json").read_text()) == {"held": True}


@pytest.mark.slow
def test_the_ranks_of_a_ddp_fit_share_the_new_folder_rank_0_created(tmp_path):
    year = tmp_path / "outputs" / "x" / datetime.now().strftime("%Y")
    year.mkdir(parents=True)  # taken: rank 0 creates <year>_1, and Lightning's re-launched rank 1 must use it too
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run(
        [sys.executable, "-m", "metaloop", "fit", *SINE, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
         "task.num_val_tasks=4", "task.num_test_tasks=4", "hydra.run.dir=outputs/x/${now:%Y}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in year.parent.iterdir()) == [year.name, f"{year.name}_1"]
    assert not any(year.iterdir())
    assert _step(year.parent / f"{year.name}_1" / "checkpoints" / "last.ckpt") == 2


# -- B2. a sweep folder holds one sweep, whose table lists its own jobs ------------------------
def test_a_sweep_into_a_folder_another_sweep_holds_fails_at_once(tmp_path):
    sweep = tmp_path / "sweep"
    with lock_run_folder(sweep, "hydra.sweep.dir"):
        message = cli_error("fit", "-m", *SINE, "seed=0,1", f"hydra.sweep.dir={sweep}")
    assert f"sweep folder {sweep} is in use by another metaloop sweep (pid {os.getpid()})" in message
    assert len(message.splitlines()) == 1
    assert sorted(p.name for p in sweep.iterdir()) == [LOCK_NAME]


def test_a_sweeps_table_reads_only_its_own_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    (sweep / "7").mkdir(parents=True)
    # what another sweep's job writes into the same folder while this one runs
    foreign = {"job": 7, "overrides": ["seed=7"], "folder": str(sweep / "7"), "started": 4e9, "ended": 4e9,
               "status": "ok", "metrics": {"test/loss_post": 123.0}}
    (sweep / "7" / RECORD).write_text(json.dumps(foreign))
    cli("fit", "-m", *SINE, "seed=0", f"hydra.sweep.dir={sweep}")
    table = (sweep / "sweep_results.csv").read_text()
    assert "123.0" not in table and len(table.strip().splitlines()) == 2


def test_a_sweep_job_whose_folder_another_run_holds_fails_without_running(tmp_path):
    sweep = tmp_path / "sweep"
    with lock_run_folder(sweep / "0"):
        message = cli_error("fit", "-m", *SINE, "seed=0", f"hydra.sweep.dir={sweep}")
    assert "1 of 1 sweep jobs did not finish" in message
    row = (sweep / "sweep_results.csv").read_text().splitlines()[1]
    assert f"run folder {sweep / '0'} is in use by another metaloop run (pid {os.getpid()})" in row
    assert not (sweep / "0" / "checkpoints").exists()


@pytest.mark.slow
def test_two_sweeps_started_at_once_in_one_folder_one_fails_and_the_other_reports_its_own_jobs(tmp_path):
    sweep, release = tmp_path / "sweep", tmp_path / "release"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "metaloop.cli", "fit", "-m", *SINE, f"hydra.sweep.dir={sweep}"]
    wait = ["+callbacks.wait._target_=cli_helpers.WaitForFile", f"+callbacks.wait.path={release}"]
    first = subprocess.Popen([*command, *wait, "inner.lr=0.01"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(3000):  # the first sweep's job has started once its folder has a log
            if list(sweep.glob("0/logs/*")) or first.poll() is not None:
                break
            threading.Event().wait(0.1)
        second = subprocess.run([*command, "inner.lr=0.02"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    finally:
        release.touch()
        first_out, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err[-3000:]
    assert second.returncode != 0 and f"sweep folder {sweep} is in use by another metaloop sweep" in second.stderr
    rows = (sweep / "sweep_results.csv").read_text().splitlines()
    assert len(rows) == 2 and "ok" in rows[1]
    assert "inner.lr=0.01" in (sweep / "0" / ".hydra" / "overrides.yaml").read_text()


# -- B3. a new fit never goes into a folder holding a finished run ------------------------------
def test_a_second_fit_into_a_finished_run_folder_is_refused_before_writing(fitted):
    before = _files(fitted)
    message = cli_error("fit", *SINE, *SMALL_EVAL, f"hydra.run.dir={fitted}")
    assert f"run folder {fitted} already holds a finished run" in message
    assert "ckpt_path=last" in message and "new folder" in message and len(message.splitlines()) == 1
    assert _files(fitted) == before


def test_a_folder_holding_only_a_config_is_reused(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 5\n")
    cli("fit", *SINE, f"hydra.run.dir={run}")
    assert _step(run / "checkpoints" / "last.ckpt") == 2


def test_a_sweep_rerun_into_a_finished_sweep_folder_is_refused_and_resumed_with_last(tmp_path):
    sweep = tmp_path / "sweep"
    cli("fit", "-m", *SINE, "seed=0", f"hydra.sweep.dir={sweep}")
    before = _files(sweep)
    message = cli_error("fit", "-m", *SINE, "seed=0", f"hydra.sweep.dir={sweep}")
    assert f"sweep folder {sweep} already holds a sweep's jobs" in message and "ckpt_path=last" in message
    assert _files(sweep) == before
    cli("fit", "-m", *SINE, "seed=0", "trainer.max_steps=3", "ckpt_path=last", f"hydra.sweep.dir={sweep}")
    assert sorted(p.name for p in (sweep / "0" / "checkpoints").iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    assert _step(sweep / "0" / "checkpoints" / "last.ckpt") == 3


# -- B4. last.ckpt holds the latest step wherever the folder lives ------------------------------
def test_resuming_a_moved_run_folder_saves_the_new_steps_to_its_last_checkpoint(tmp_path):
    first, moved = tmp_path / "first", tmp_path / "moved"
    cli("fit", *SINE, f"hydra.run.dir={first}")
    first.rename(moved)
    cli("fit", *SINE, "trainer.max_steps=4", "ckpt_path=last", f"hydra.run.dir={moved}")
    assert sorted(p.name for p in (moved / "checkpoints").iterdir()) == ["epoch=0-step=4.ckpt", "last.ckpt"]
    assert _step(moved / "checkpoints" / "last.ckpt") == 4
    assert json.loads((moved / "results.json").read_text())["global_step"] == 4


# -- B5. a longer run continues the schedule its length defines -----------------------------------
def test_resuming_with_more_steps_continues_the_schedule_of_the_new_length(tmp_path, capsys):
    run = tmp_path / "run"
    reptile = ["--config", "reptile_sinusoid.yaml", *TINY, "inner.steps=1", "inner.eval_steps=1", "test_after_fit=false"]
    cli("fit", *reptile, f"hydra.run.dir={run}")
    at_2 = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    cli("fit", *reptile, "trainer.max_steps=4", "ckpt_path=last", f"hydra.run.dir={run}")
    at_4 = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert "the learning-rate schedule follows this configuration (LinearLR total_iters 2 -> 4)" in capsys.readouterr().out
    # linear decay from 0.1 to 0 over 4 meta-steps: 0.05 at the third, 0.025 at the fourth (Reptile's eps); not 0
    schedule = at_4["lr_schedulers"][0]
    assert schedule["total_iters"] == 4 and schedule["last_epoch"] == 4
    assert any(not torch.equal(at_2["state_dict"][k], v) for k, v in at_4["state_dict"].items())


# -- B6. a resume is the same experiment unless a change is meant ---------------------------------
def test_resuming_with_other_experiment_settings_is_refused_unless_allowed_and_then_recorded(tmp_path, capsys):
    run = tmp_path / "run"
    cli("fit", *SINE, f"hydra.run.dir={run}")
    before = _files(run)
    message = cli_error("fit", *SINE, "seed=1", "inner.lr=0.02", "trainer.max_steps=4", "ckpt_path=last",
                        f"hydra.run.dir={run}")
    assert "with other experiment settings than it was fitted with: seed 0 -> 1, inner.lr 0.01 -> 0.02" in message
    assert "resume_changes=allow" in message and len(message.splitlines()) == 1
    assert _files(run) == before
    capsys.readouterr()
    cli("fit", *SINE, "seed=1", "trainer.max_steps=4", "resume_changes=allow", "ckpt_path=last", f"hydra.run.dir={run}")
    assert "resuming with changed experiment settings (resume_changes=allow): seed 0 -> 1" in capsys.readouterr().out
    record = next((run / ".hydra").glob("resume-*/resume_changes.yaml"))
    assert yaml.safe_load(record.read_text()) == {"seed": {"checkpoint": 0, "now": 1}}
    assert _step(run / "checkpoints" / "last.ckpt") == 4


# -- B7. an evaluation uses the configuration the checkpoint was fitted with ----------------------
def test_test_takes_the_checkpoints_settings_and_says_which_it_overrides(fitted, tmp_path, capsys):
    fit_loss = last_metrics(fitted)["test/loss_post"]
    checkpoint = fitted / "checkpoints" / "last.ckpt"
    cli("test", *SINE, *SMALL_EVAL, f"ckpt_path={checkpoint}", f"hydra.run.dir={tmp_path / 'same'}")
    assert last_metrics(tmp_path / "same")["test/loss_post"] == pytest.approx(fit_loss, rel=1e-6)
    # no recipe: the checkpoint's own
    cli("test", *TINY, *SMALL_EVAL, f"ckpt_path={checkpoint}", f"hydra.run.dir={tmp_path / 'no_recipe'}")
    assert last_metrics(tmp_path / "no_recipe")["test/loss_post"] == pytest.approx(fit_loss, rel=1e-6)
    capsys.readouterr()
    cli("test", *SINE, *SMALL_EVAL, "inner.lr=0.02", f"ckpt_path={checkpoint}", f"hydra.run.dir={tmp_path / 'other'}")
    assert "evaluating with inner.lr=0.02 instead of the checkpoint's 0.1" in capsys.readouterr().out
    assert last_metrics(tmp_path / "other")["test/loss_post"] != pytest.approx(fit_loss, rel=1e-6)


def test_test_builds_the_options_the_checkpoint_was_fitted_with(tmp_path):
    cli("fit", *SINE, *SMALL_EVAL, "learnable=per_param_lr", "outer_optim=sgd", f"hydra.run.dir={tmp_path / 'fit'}")
    checkpoint = tmp_path / "fit" / "checkpoints" / "last.ckpt"
    cli("test", *SINE, *SMALL_EVAL, f"ckpt_path={checkpoint}", f"hydra.run.dir={tmp_path / 'test'}")
    assert last_metrics(tmp_path / "test")["test/loss_post"] == pytest.approx(last_metrics(tmp_path / "fit")["test/loss_post"], rel=1e-6)
    overrides = yaml.safe_load(next((tmp_path / "test" / ".hydra").glob("test-*/overrides.yaml")).read_text())
    assert {"learnable=per_param_lr", "outer_optim=sgd"} <= set(overrides)


@pytest.mark.parametrize("node,group,shown", [
    (("module",), "module", "_target_=builtins.open"),
    (("task", "objective"), "task", "objective._target_=builtins.open"),
])
def test_a_stored_target_is_never_built_by_an_evaluation(fitted, tmp_path, node, group, shown):
    marker = tmp_path / "written"
    state = torch.load(fitted / "checkpoints" / "last.ckpt", weights_only=True)
    stored = yaml.safe_load(state[CONFIG_KEY])
    parent = stored
    for key in node[:-1]:
        parent = parent[key]
    parent[node[-1]] = {**parent[node[-1]], "_target_": "builtins.open", "file": str(marker), "mode": "w"}
    state[CONFIG_KEY] = yaml.safe_dump(stored)
    torch.save(state, tmp_path / "forged.ckpt")
    message = cli_error("test", *SINE, f"ckpt_path={tmp_path / 'forged.ckpt'}", f"hydra.run.dir={tmp_path / 'test'}")
    assert f"the checkpoint's {group} builds {shown}, which none of the {group} options builds" in message
    assert len(message.splitlines()) == 1 and not marker.exists()


# -- D. a run folder that cannot be one ------------------------------------------------------------
def test_a_run_folder_that_is_a_file_is_one_line_before_anything_is_written(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("notes")
    message = cli_error("fit", *SINE, f"hydra.run.dir={taken}")
    assert message == f"metaloop: error: hydra.run.dir={taken} is a file, not a folder; choose a folder this user can create and write, e.g. hydra.run.dir=runs/NAME"
    assert taken.read_text() == "notes"
    message = cli_error("fit", *SINE, f"hydra.run.dir={taken / 'run'}")
    assert f"hydra.run.dir={taken / 'run'} cannot be created: {taken} is a file" in message


def test_a_read_only_run_folder_is_one_line(tmp_path):
    if os.geteuid() != 0:
        readonly = tmp_path / "readonly"
        readonly.mkdir()
        readonly.chmod(0o555)
        target = readonly / "run"
    elif Path("/sys/fs").is_dir():
        target = Path("/sys/fs/metaloop-run")  # root writes through file modes; sysfs refuses new folders
    else:
        pytest.skip("no read-only folder for root on this machine")
    message = cli_error("fit", *SINE, f"hydra.run.dir={target}")
    assert message.startswith(f"metaloop: error: hydra.run.dir={target} cannot be written (") and len(message.splitlines()) == 1
    assert not target.exists()


# -- the pure parts -----------------------------------------------------------------------------------
@pytest.mark.parametrize("module", [stored_config, callbacks])
def test_the_docstring_examples_run(module):
    assert doctest.testmod(module).failed == 0


def test_a_stored_object_or_interpolation_is_never_passed_on_as_a_value():
    with pytest.raises(ValueError, match="names an object to build"):
        hydra_value([{"_target_": "os.system", "command": "true"}])
    with pytest.raises(ValueError, match="is an interpolation"):
        hydra_value("${oc.env:HOME}")
    stored = {"inner": {"params": {"_target_": "os.system"}, "lr": 0.1}}
    with pytest.raises(ValueError, match="the checkpoint's inner.params="):
        value_overrides(stored, {"inner": {"params": None, "lr": 0.4}}, set())
    assert value_overrides(stored, {"inner": {"params": None, "lr": 0.4}}, {"inner.params"}) == ["inner.lr=0.1"]


def test_run_keys_never_count_as_changes_and_derived_values_follow_their_source():
    stored = {"seed": 0, "trainer": {"max_steps": 10, "gradient_clip_val": None}, "task": {"k_shots": 5, "num_test_tasks": 600}}
    current = {"seed": 0, "trainer": {"max_steps": 20, "gradient_clip_val": 1.0}, "task": {"k_shots": "${oc.select:x,5}", "num_test_tasks": 10}}
    assert experiment_changes(stored, current) == {"trainer.gradient_clip_val": (None, 1.0)}
