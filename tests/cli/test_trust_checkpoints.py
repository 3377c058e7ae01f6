"""Checkpoints through the ``metaloop`` command (issue 19): downloads are bounded and deleted, a full disk is one line."""

from __future__ import annotations

import tempfile

import pytest
from cli_helpers import SMALL_EVAL, TINY, cli, cli_error

from metaloop.lightning.checkpoint import MAX_DOWNLOAD_ENV, load_checkpoint

SINE = ["--config", "maml_sinusoid.yaml", *TINY]


@pytest.fixture
def tmpdir_here(tmp_path, monkeypatch):
    """Points $TMPDIR (and tempfile's cached choice of it) at an empty ``tmp_path/tmpdir``."""
    folder = tmp_path / "tmpdir"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_a_checkpoint_evaluated_from_a_url_is_deleted_after_the_run(http_folder, trained, tmp_path, tmpdir_here):
    (http_folder.root / "last.ckpt").write_bytes((trained / "checkpoints" / "last.ckpt").read_bytes())
    cli("test", *SINE, *SMALL_EVAL, f"ckpt_path={http_folder.url}/last.ckpt", f"hydra.run.dir={tmp_path / 'remote'}")
    assert http_folder.requested == ["/last.ckpt"]  # downloaded once
    assert list(tmpdir_here.glob("metaloop-ckpt-*")) == []
    # and when the run fails after the download: a checkpoint of another model
    message = cli_error("test", *SINE, *SMALL_EVAL, "model.sizes=[1,8,1]", f"ckpt_path={http_folder.url}/last.ckpt", f"hydra.run.dir={tmp_path / 'other'}")
    assert "does not fit this configuration" in message
    assert list(tmpdir_here.glob("metaloop-ckpt-*")) == []


def test_a_checkpoint_over_the_download_limit_is_one_line(http_folder, trained, tmp_path, tmpdir_here, monkeypatch):
    (http_folder.root / "last.ckpt").write_bytes((trained / "checkpoints" / "last.ckpt").read_bytes())
    monkeypatch.setenv(MAX_DOWNLOAD_ENV, "1000")
    message = cli_error("test", *SINE, f"ckpt_path={http_folder.url}/last.ckpt", f"hydra.run.dir={tmp_path / 'remote'}")
    assert message.startswith(f"metaloop: error: the checkpoint {http_folder.url}/last.ckpt is larger than the download limit of 1000 bytes")
    assert "\n" not in message and MAX_DOWNLOAD_ENV in message
    assert list(tmpdir_here.iterdir()) == []


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, tmpdir_here, request, capfd):
    run = tmp_path / "run"
    common = [*SINE, *SMALL_EVAL, f"hydra.run.dir={run}"]
    cli("fit", *common)
    checkpoints = run / "checkpoints"
    before = {p.name: p.read_bytes() for p in checkpoints.iterdir()}
    request.getfixturevalue("disk_full_while_checkpointing")
    capfd.readouterr()
    message = cli_error("fit", *common, "trainer.max_steps=4", "ckpt_path=last")
    assert "Traceback" not in capfd.readouterr().err
    assert {p.name: p.read_bytes() for p in checkpoints.iterdir()} == before  # nothing truncated, no temporary file
    assert list(tmpdir_here.iterdir()) == []
    assert load_checkpoint(checkpoints / "last.ckpt")["global_step"] == 2
    assert "\n" not in message
    assert message.startswith(f"metaloop: error: could not save the checkpoint epoch=0-step=4.ckpt in {checkpoints}: No space left on device; ")
    assert "intact" in message and f"resume with hydra.run.dir={run} ckpt_path=last" in message


def test_the_readmes_example_rebuilds_a_fitted_runs_module_and_tasks(trained):
    from metaloop.lightning import MetaLightningModule, checkpoint_config, load_tasks
    from metaloop.tasks import sample_task

    path = trained / "checkpoints" / "last.ckpt"
    module = MetaLightningModule.load_from_checkpoint(path)
    tasks = load_tasks(path)
    cfg = checkpoint_config(path)
    task = sample_task(tasks.tasks, "test", cfg.seed, 0)
    fmodel = module.adapt((task.support_x, task.support_y))
    assert fmodel(task.query_x).shape == task.query_y.shape
