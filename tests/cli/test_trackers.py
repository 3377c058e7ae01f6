"""Experiment trackers (``logger=mlflow``, ``logger=wandb``): metrics, the composed config, learned hyperparameters,
final results and a sweep's jobs grouped; MLflow against a real tracking server on 127.0.0.1, W&B offline."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import TINY, cli, cli_error

import metaloop
import metaloop.cli

ROOT = Path(metaloop.__file__).resolve().parents[1]
SINE = ["--config", "maml_sinusoid.yaml", *TINY, "learnable=inner_lr"]
needs_mlflow = pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="needs mlflow (metaloop[mlflow])")
needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="needs wandb (metaloop[wandb])")


def _results(run: Path) -> dict[str, float]:
    return json.loads((run / "results.json").read_text())["metrics"]


def _sweep(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    """Returns the finished two-job sweep ``seed=0,1`` in ``tmp_path/sweep`` (its own processes)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    return subprocess.run(
        [sys.executable, "-m", "metaloop", "fit", "-m", *SINE, *overrides, "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )


# -- missing packages: one line naming the extra -------------------------------------------------
@pytest.mark.parametrize("option,module,flag", [("mlflow", "mlflow", "_MLFLOW_AVAILABLE"), ("wandb", "wandb", "_WANDB_AVAILABLE")])
def test_a_tracker_that_is_not_installed_says_what_to_install(monkeypatch, tmp_path, option, module, flag):
    import importlib

    from lightning_utilities.core.imports import RequirementCache

    # as if the package were missing: Lightning's logger refuses to be built
    monkeypatch.setattr(importlib.import_module(f"lightning.pytorch.loggers.{module}"), flag, RequirementCache(f"{module}>=999"))
    message = cli_error("fit", *SINE, f"logger={option}", f"hydra.run.dir={tmp_path / 'run'}")
    assert message.startswith("metaloop: error: ") and "\n" not in message and f"{module}>=999" in message
    assert f"(logger={option} needs `pip install 'metaloop[{option}]'`; or use logger=csv)" in message
    assert not (tmp_path / "run" / "checkpoints").exists()


# -- MLflow: a real tracking server ---------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Yields the address of an MLflow tracking server on 127.0.0.1 (SQLite backend), stopped after the module."""
    if importlib.util.find_spec("mlflow") is None:
        pytest.skip("needs mlflow (metaloop[mlflow])")
    folder, port = tmp_path_factory.mktemp("mlflow"), _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--default-artifact-root", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=folder, stdout=open(folder / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # the first start creates the database's tables (seconds to a minute)
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, f"the MLflow server exited: {(folder / 'server.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the MLflow server did not answer in 180 s: {(folder / 'server.log').read_text()[-3000:]}"
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn worker
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


@needs_mlflow
@pytest.mark.slow
def test_a_run_logs_metrics_config_learned_hyperparameters_and_results_to_an_mlflow_server(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    cli("fit", *SINE, "logger=mlflow", f"logger.tracking_uri={mlflow_server}", f"hydra.run.dir={run_dir}")
    client = MlflowClient(mlflow_server)
    [run] = client.search_runs([client.get_experiment_by_name("maml_sinusoid").experiment_id])
    assert run.info.status == "FINISHED"
    # the composed config (flattened) and the module's own hyperparameters
    params = run.data.params
    assert (params["recipe"], params["seed"], params["inner/lr"], params["task/k_shots"]) == ("maml_sinusoid", "0", "0.01", "10")
    assert params["model/_target_"] == "metaloop.nn.MLP" and params["inner/steps"] == "1"
    # metrics: training, the learned inner learning rate at every step, validation and test
    assert {"train/loss", "val/loss_post", "test/loss_post"} <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "hp/lr")] == [0, 1]
    # the final results: results.json, at the last meta-step
    results = _results(run_dir)
    for name, value in results.items():
        assert run.data.metrics[f"results/{name}"] == pytest.approx(value, rel=1e-6), name
    assert client.get_metric_history(run.info.run_id, "results/test/loss_post")[0].step == 2
    assert run.data.metrics["results/meta_steps_per_s"] > 0
    assert not (run_dir / "mlflow.db").exists()  # the server holds the run


@needs_mlflow
@pytest.mark.slow
def test_a_sweeps_jobs_share_a_tag_on_the_mlflow_server(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    done = _sweep(tmp_path, "logger=mlflow", f"logger.tracking_uri={mlflow_server}")
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("maml_sinusoid").experiment_id
    runs = client.search_runs([experiment], filter_string="tags.sweep = 'sweep'")
    assert sorted(r.data.params["seed"] for r in runs) == ["0", "1"]
    for run in runs:
        job = tmp_path / "sweep" / run.data.params["seed"]
        assert run.data.params["sweep/group"] == "sweep"
        assert run.data.metrics["results/test/loss_post"] == pytest.approx(_results(job)["test/loss_post"], rel=1e-6)


@needs_mlflow
def test_the_default_mlflow_store_is_in_the_run_folder(tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    cli("fit", *SINE, "logger=mlflow", f"hydra.run.dir={run_dir}")
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("maml_sinusoid").experiment_id])
    assert run.data.metrics["results/val/loss_post"] == pytest.approx(_results(run_dir)["val/loss_post"], rel=1e-6)
    assert not (tmp_path / "mlruns").exists()


# -- W&B: offline run files -----------------------------------------------------------------------
def _wandb_records(path: Path) -> Iterator[object]:
    """Yields the protobuf records of a W&B run file (``run-ID.wandb``: a LevelDB-style log of 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    ident, _, _ = struct.unpack("<4sHB", raw[:7])
    assert ident == b":W&B", f"{path} is not a W&B run file"
    pos, pending = 7, b""
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = data if kind in (1, 2) else pending + data  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _wandb_run(folder: Path) -> dict:
    """Returns the group, config, metric history and summary of the one offline W&B run under ``folder/wandb``."""
    [path] = folder.glob("wandb/offline-run-*/run-*.wandb")
    run: dict = {"config": {}, "history": {}, "summary": {}, "exit": None}
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["group"], run["project"] = record.run.run_group, record.run.project
        elif kind == "config":
            run["config"].update({item.key: json.loads(item.value_json) for item in record.config.update if item.key})
        elif kind == "history":
            for item in record.history.item:
                run["history"].setdefault("/".join(item.nested_key) or item.key, []).append(json.loads(item.value_json))
        elif kind == "summary":
            run["summary"].update({"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.summary.update})
        elif kind == "exit":
            run["exit"] = record.exit.exit_code
    return run


@needs_wandb
@pytest.mark.slow
def test_a_sweeps_jobs_log_offline_to_wandb_in_one_group(tmp_path):
    done = _sweep(tmp_path, "logger=wandb")
    assert done.returncode == 0, done.stderr[-3000:]
    for seed in ("0", "1"):
        job = tmp_path / "sweep" / seed
        run = _wandb_run(job)
        assert (run["group"], run["project"], run["exit"]) == ("sweep", "maml_sinusoid", 0)
        # the composed config, nested, and the module's own hyperparameters
        assert run["config"]["seed"] == int(seed) and run["config"]["inner"]["lr"] == 0.01
        assert run["config"]["model"]["_target_"] == "metaloop.nn.MLP" and run["config"]["inner"]["steps"] == 1
        assert len(run["history"]["hp/lr"]) == 2 and len(run["history"]["train/loss"]) == 2
        for name, value in _results(job).items():
            assert run["summary"][f"results/{name}"] == pytest.approx(value, rel=1e-6), name
