"""Runs you can trust: no code from checkpoints, no lost or overwritten results, configs that mean what they say.

Each test reproduces a failure seen on the first release (issue 10) through the ``metaloop`` command.
"""

from __future__ import annotations

import http.server
import math
import os
import pickle
import signal
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
import torch
from cli_helpers import SMALL_EVAL, TINY, cli, cli_error, last_metrics

from metaloop.cli.runs import lock_run_folder

SINE = ["--config", "maml_sinusoid.yaml", *TINY]


class _Payload:
    """A pickle that runs code while it loads: it creates the file ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _malicious_checkpoint(path: Path, marker: Path) -> Path:
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}, "payload": _Payload(marker)}, f)
    return path


@pytest.fixture
def served(tmp_path):
    """Serves ``tmp_path/www`` on 127.0.0.1 for the test; yields the base URL."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# -- 1. checkpoints never execute code --------------------------------------------------------
def test_a_checkpoint_from_a_url_is_loaded_without_running_its_code(served, tmp_path):
    root, url = served
    marker = tmp_path / "pwned"
    _malicious_checkpoint(root / "model.ckpt", marker)
    message = cli_error("test", *SINE, f"ckpt_path={url}/model.ckpt", f"hydra.run.dir={tmp_path / 'run'}")
    assert "holds pickled code" in message and "refuses to load it" in message
    assert not marker.exists()


def test_a_local_checkpoint_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = _malicious_checkpoint(tmp_path / "model.ckpt", marker)
    for command in ("test", "validate", "fit"):
        message = cli_error(command, *SINE, f"ckpt_path={checkpoint}", f"hydra.run.dir={tmp_path / command}")
        assert f"checkpoint {checkpoint} holds pickled code" in message
    assert not marker.exists()


def test_a_checkpoint_from_a_url_evaluates_like_the_local_file(served, trained, tmp_path):
    root, url = served
    (root / "last.ckpt").write_bytes((trained / "checkpoints" / "last.ckpt").read_bytes())
    cli("test", *SINE, *SMALL_EVAL, f"ckpt_path={url}/last.ckpt", f"hydra.run.dir={tmp_path / 'remote'}")
    cli("test", *SINE, *SMALL_EVAL, f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={tmp_path / 'local'}")
    assert last_metrics(tmp_path / "remote")["test/loss_post"] == last_metrics(tmp_path / "local")["test/loss_post"]


def test_no_code_path_loads_checkpoints_unsafely():
    repo = Path(__file__).resolve().parents[2]
    for folder in ("metaloop", "reports", "benchmarks"):
        for path in (repo / folder).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                assert "weights_only=False" not in line, f"{path}:{number} loads a pickle that may run code"


# -- 2. the declared torch floor is the tested one ---------------------------------------------
def test_the_declared_torch_floor_is_the_version_setup_installs_and_tests():
    repo = Path(__file__).resolve().parents[2]
    dependencies = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["dependencies"]
    floor = next(d for d in dependencies if d.startswith("torch"))
    tested = next(line for line in (repo / "scripts" / "setup.sh").read_text().splitlines() if "torch==" in line and "install" in line)
    version = tested.split("torch==")[1].split('"')[0]
    assert floor == f"torch>={version}"
    assert torch.__version__.startswith(version)


# -- 3. a diverging run never overwrites a good checkpoint -------------------------------------
def test_a_diverging_resume_fails_and_keeps_the_finite_checkpoints(tmp_path):
    run = tmp_path / "run"
    common = [*SINE, *SMALL_EVAL, "trainer.val_check_interval=5", f"hydra.run.dir={run}"]
    cli("fit", *common, "trainer.max_steps=20")
    saved = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    # inner.lr changes the experiment: a resume takes it only when told the change is meant
    message = cli_error("fit", *common, "trainer.max_steps=30", "inner.lr=1e6", "resume_changes=allow", "ckpt_path=last")
    assert "meta-step 21" in message and "inner.lr=1000000.0" in message and "ckpt_path=last" in message
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == saved
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 20
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())


def test_a_non_finite_first_step_writes_no_checkpoint_and_exits_non_zero(tmp_path):
    run = tmp_path / "run"
    message = cli_error("fit", *SINE, "inner.lr=1e30", f"hydra.run.dir={run}")
    assert "meta-step 1" in message and "NaN or infinite" in message
    assert not list((run / "checkpoints").glob("*.ckpt")) if (run / "checkpoints").exists() else True


# -- 4. the final model is saved -----------------------------------------------------------------
def test_last_checkpoint_holds_the_weights_the_summary_reports(tmp_path, capsys):
    run = tmp_path / "run"
    cli("fit", *SINE, *SMALL_EVAL, "trainer.max_steps=3", "trainer.val_check_interval=2", f"hydra.run.dir={run}")
    fitted = last_metrics(run)["test/loss_post"]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    cli("test", *SINE, *SMALL_EVAL, f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={tmp_path / 'test'}")
    assert last_metrics(tmp_path / "test")["test/loss_post"] == pytest.approx(fitted, rel=1e-6)


@pytest.mark.slow
def test_sigterm_saves_the_step_reached_and_exits_non_zero(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    term = ["+callbacks.term._target_=cli_helpers.SigtermAt", "+callbacks.term.step=3"]
    done = subprocess.run(
        [sys.executable, "-m", "metaloop.cli", "fit", *SINE, "trainer.max_steps=10", "trainer.val_check_interval=2",
         *term, f"hydra.run.dir={run}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-3000:]
    assert "stopped by SIGTERM at meta-step 3" in done.stderr
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


# -- 5. evaluation and resume use the model you mean ---------------------------------------------
def test_evaluation_needs_a_checkpoint_unless_asked_for_the_untrained_model(tmp_path):
    for command in ("test", "validate"):
        message = cli_error(command, *SINE, f"hydra.run.dir={tmp_path / command}")
        assert "needs the checkpoint to evaluate" in message and "ckpt_path=none" in message
        assert not (tmp_path / command).exists()
    cli("test", *SINE, *SMALL_EVAL, "ckpt_path=none", f"hydra.run.dir={tmp_path / 'baseline'}")
    assert math.isfinite(last_metrics(tmp_path / "baseline")["test/loss_post"])


def test_resume_from_last_with_nothing_to_resume_says_where_it_looked(tmp_path):
    assert "no hydra.run.dir was given" in cli_error("fit", *SINE, "ckpt_path=last")
    empty = tmp_path / "empty"
    message = cli_error("fit", *SINE, "ckpt_path=last", f"hydra.run.dir={empty}")
    assert f"found no {empty / 'checkpoints' / 'last.ckpt'}" in message
    assert "ckpt_path=/nonexistent.ckpt does not exist" in cli_error("fit", *SINE, "ckpt_path=/nonexistent.ckpt")


@pytest.mark.parametrize("change,expected", [
    (["model.sizes=[1,80,80,1]"], "shapes differ: model.features.0.weight (40, 1) in the checkpoint, (80, 1) here"),
    (["outer_optim=sgd"], "the outer optimizer differs"),
    (["learnable=per_param_lr"], "weights this configuration has but the checkpoint lacks: learned.lr/"),
])
def test_resuming_with_a_config_that_does_not_fit_names_the_mismatch(trained, change, expected, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(trained / "checkpoints", run / "checkpoints")
    record = (trained / ".hydra" / "config.yaml").read_bytes()
    # meant as a change (resume_changes=allow), a configuration that does not fit the weights still fails
    message = cli_error("fit", *SINE, *SMALL_EVAL, *change, "trainer.max_steps=4", "resume_changes=allow", "ckpt_path=last",
                        f"hydra.run.dir={run}")
    assert expected in message and len(message.splitlines()) == 1
    assert (trained / ".hydra" / "config.yaml").read_bytes() == record


def test_test_in_a_run_folder_keeps_the_fits_record(trained):
    record = (trained / ".hydra" / "config.yaml").read_bytes()
    cli("test", *SINE, *SMALL_EVAL, "ckpt_path=last", f"hydra.run.dir={trained}")
    assert (trained / ".hydra" / "config.yaml").read_bytes() == record
    assert list((trained / ".hydra").glob("test-*/config.yaml"))


@pytest.mark.parametrize("damage", ["truncated", "empty", "random"])
def test_a_damaged_checkpoint_names_the_file_and_an_intact_sibling(trained, damage, tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    good = (trained / "checkpoints" / "last.ckpt").read_bytes()
    (folder / "epoch=0-step=2.ckpt").write_bytes(good)
    damaged = folder / "last.ckpt"
    damaged.write_bytes({"truncated": good[: len(good) // 2], "empty": b"", "random": os.urandom(4096)}[damage])
    message = cli_error("test", *SINE, f"ckpt_path={damaged}", f"hydra.run.dir={tmp_path / 'run'}")
    assert f"checkpoint {damaged}" in message and "truncated" in message
    assert f"an intact checkpoint in the same folder: {folder / 'epoch=0-step=2.ckpt'}" in message


# -- 6. two runs never share a run folder silently -----------------------------------------------
def test_a_second_run_in_a_busy_run_folder_fails_before_writing(tmp_path):
    run = tmp_path / "run"
    with lock_run_folder(run):
        message = cli_error("fit", *SINE, f"hydra.run.dir={run}")
    assert f"run folder {run} is in use by another metaloop run (pid {os.getpid()})" in message
    assert sorted(p.name for p in run.iterdir()) == [".metaloop.lock"]
    cli("fit", *SINE, *SMALL_EVAL, f"hydra.run.dir={run}")  # free again once the first run ends


@pytest.mark.slow
def test_two_runs_started_at_once_in_one_folder_one_fails(tmp_path):
    run, release = tmp_path / "run", tmp_path / "release"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    command = [sys.executable, "-m", "metaloop.cli", "fit", *SINE, *SMALL_EVAL, f"hydra.run.dir={run}"]
    wait = ["+callbacks.wait._target_=cli_helpers.WaitForFile", f"+callbacks.wait.path={release}"]
    first = subprocess.Popen([*command, *wait, "seed=1"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(3000):  # Hydra records the first run once it holds the folder; it then waits for `release`
            if (run / ".hydra" / "config.yaml").exists() or first.poll() is not None:
                break
            threading.Event().wait(0.1)
        second = subprocess.run([*command, "seed=2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    finally:
        release.touch()
        first_err = first.communicate(timeout=300)[1]
    assert first.returncode == 0, first_err[-3000:]
    assert second.returncode != 0 and "is in use by another metaloop run" in second.stderr
    assert "seed: 1" in (run / ".hydra" / "config.yaml").read_text()


# -- 7. typed, validated configs ------------------------------------------------------------------
@pytest.mark.parametrize("override,expected", [
    ("inner.first_order=no", "inner.first_order='no' is not accepted (not a boolean); use true or false"),
    ("inner.lr=abc", "inner.lr='abc' is not accepted (not a number)"),
    ("seed=abc", "seed='abc' is not accepted (not a whole number)"),
    ("inner.steps=1.5", "inner.steps=1.5 is not accepted (not a whole number)"),
    ("trainer.val_check_interval=0", "trainer.val_check_interval=0 is not accepted (it is below 1)"),
    ("trainer.max_steps=-1", "trainer.max_steps=-1 is not accepted (it is below 1)"),
    ("inner.batch_tasks=parallel", "inner.batch_tasks='parallel' is not accepted (not one of the choices); use one of auto, vmap, sequential"),
    ("inner.params='['", "inner.params='[' is not accepted (not a regular expression"),
    ("+inner_optim.momentumm=0.9", "inner_optim.momentumm is not an argument of torch.optim.SGD"),
    ("task.meta_batch_size=0", "task.meta_batch_size=0 is not accepted (it is below 1)"),
    ("inner.meta_grad=implicitt", "inner.meta_grad='implicitt' is not accepted (not one of the choices); use one of unrolled, truncated, implicit"),
    ("inner.implicit.solver=lu", "inner.implicit.solver='lu' is not accepted"),
    ("inner.truncate=0", "inner.truncate=0 is not accepted (it is below 1)"),
    ("trainer.precision=16-mixed", "trainer.precision='16-mixed' is not accepted (not one of the choices); use one of auto, 32-true, 32, 64-true, 64, bf16-mixed"),
    ("trainer.precision=bf16-true", "trainer.precision='bf16-true' is not accepted (not one of the choices)"),
    ("memory_format=nhwc", "memory_format='nhwc' is not accepted (not one of the choices); use one of auto, channels_last, contiguous"),
])
def test_a_bad_value_is_one_line_naming_key_value_and_what_is_accepted_before_any_file(override, expected, tmp_path):
    message = cli_error("fit", *SINE, override, f"hydra.run.dir={tmp_path / 'run'}")
    assert expected in message and len(message.splitlines()) == 1
    assert not (tmp_path / "run").exists() and not Path("outputs").exists()


@pytest.mark.parametrize("precision", ["auto", "bf16-mixed", "32"])
def test_precision_auto_is_resolved_for_the_machine_and_bf16_mixed_trains(precision, tmp_path):
    from metaloop.lightning import checkpoint_config
    from metaloop.lightning.precision import auto_precision

    cli("fit", *SINE, f"trainer.precision={precision}", f"hydra.run.dir={tmp_path / 'run'}")
    saved = checkpoint_config(tmp_path / "run" / "checkpoints" / "last.ckpt")
    expected = {"auto": auto_precision("cpu"), "bf16-mixed": "bf16-mixed", "32": 32}[precision]
    assert saved.trainer.precision == expected
    assert math.isfinite(last_metrics(tmp_path / "run")["train/loss"])


def test_a_bad_value_in_any_job_of_a_sweep_fails_before_the_first_job(tmp_path):
    message = cli_error("fit", "-m", *SINE, "seed=0,1,x", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert "seed='x' is not accepted" in message
    assert not (tmp_path / "sweep").exists()
    # an interval (what Optuna samples from) is checked at its two ends
    message = cli_error("fit", "-m", *SINE, "inner.steps=interval(1,3)", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert "inner.steps=1.0 is not accepted (not a whole number)" in message


@pytest.mark.parametrize("body,expected", [
    ("inner:\n  lrr: 5.0\n", ":8: inner.lrr is not a configuration key (inner has: batch_tasks, eval_steps, first_order, implicit, lr, meta_grad, params, steps, truncate)"),
    ("task:\n  k_shot: 2\n", ":8: task.k_shot is not a configuration key"),
    ("inner:\n  first_order: no_thanks\n", "inner.first_order='no_thanks' is not accepted"),
    ("inner_optim:\n  momentumm: 0.9\n", "inner_optim.momentumm is not an argument of torch.optim.SGD"),
])
def test_typos_inside_a_recipe_are_refused(body, expected, tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("# a recipe with a typo\ndefaults:\n  - config\n  - override task: sinusoid\n  - override model: mlp\n  - _self_\n" + body)
    message = cli_error("fit", "--config", str(recipe), *TINY, f"hydra.run.dir={tmp_path / 'run'}")
    assert expected in message and len(message.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_malformed_or_baseless_recipe_is_one_line(tmp_path):
    malformed = tmp_path / "malformed.yaml"
    malformed.write_text("defaults:\n  - config\ninner:\n  lr: [5.0\n  steps: 1\n")
    message = cli_error("fit", "--config", str(malformed))
    assert message.startswith(f"metaloop: error: {malformed}:5:") and "malformed YAML" in message
    assert len(message.splitlines()) == 1
    baseless = tmp_path / "baseless.yaml"
    baseless.write_text("inner:\n  lr: 5.0\n")
    assert "has no defaults list" in cli_error("fit", "--config", str(baseless))
    unrooted = tmp_path / "unrooted.yaml"
    unrooted.write_text("defaults:\n  - _self_\ninner:\n  lr: 5.0\n")
    assert "defaults list does not include config" in cli_error("fit", "--config", str(unrooted))


# -- 8. data errors name the file ----------------------------------------------------------------
def test_data_errors_reach_the_command_line_with_the_modules_message(tmp_path, monkeypatch):
    from metaloop.tasks import omniglot as omniglot_module

    monkeypatch.setattr(omniglot_module, "OMNIGLOT_URL", "http://127.0.0.1:9/python")  # nothing listens on port 9
    omniglot = ["--config", "maml_omniglot.yaml", *TINY, "task.full=true", f"hydra.run.dir={tmp_path / 'run'}"]
    message = cli_error("fit", *omniglot, f"task.root={tmp_path / 'data'}", "task.download=true")
    assert "could not download http://127.0.0.1:9/python/images_background.zip" in message
    assert f"put it at {tmp_path / 'data' / 'images_background.zip'}" in message
    root_file = tmp_path / "omniglot.zip"
    root_file.write_bytes(b"PK")
    assert f"Omniglot root={root_file} is a file" in cli_error("fit", *omniglot, f"task.root={root_file}")
