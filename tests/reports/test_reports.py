"""Smoke tests of the report scripts: a couple of meta-steps each, tiny evaluations, into a temporary folder."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_report(name: str, tmp_path: Path, *args: str, picture: bool = True) -> str:
    """Returns the Markdown written by ``python -m reports.NAME ARGS`` with runs and report in ``tmp_path``."""
    report_dir = tmp_path / "report"
    command = [sys.executable, "-m", f"reports.{name}", "--runs", str(tmp_path / "runs"), "--report-dir", str(report_dir)]
    command += args
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert not picture or (report_dir / f"{name}.png").stat().st_size > 0
    return (report_dir / f"{name}.md").read_text()


def table_rows(markdown: str) -> list[list[str]]:
    """Returns the cells of the Markdown table's body rows."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


@pytest.mark.slow
def test_sinusoid(tmp_path):
    args = ["--steps", "2", "--shots", "5", "20", "--recipes", "metasgd_sinusoid", "--test-tasks", "4", "--val-tasks", "4"]
    markdown = run_report("sinusoid", tmp_path, *args)
    rows = table_rows(markdown)
    assert [row[:3] for row in rows] == [["metasgd_sinusoid", "5", "2"], ["metasgd_sinusoid", "20", "2"]]
    # Values after two meta-steps are not results (those are in the benchmarks and reports): check the form only.
    for row in rows:
        for cell in row[3:5]:
            assert re.fullmatch(r"\d+\.\d+ ± \d+\.\d+", cell), cell
            assert float(cell.split(" ± ")[0]) > 0


@pytest.mark.slow
def test_omniglot(tmp_path):
    args = ["--steps", "2", "--meta-batch", "2", "--recipes", "maml_omniglot", "--test-tasks", "4", "--val-tasks", "2"]
    markdown = run_report("omniglot", tmp_path, *args)
    rows = table_rows(markdown)
    assert [row[:3] for row in rows] == [["maml_omniglot", s, "5-way 1-shot"] for s in ("5-way 1-shot", "5-way 5-shot", "20-way 1-shot")]
    assert all(re.fullmatch(r"2 × 2, \d+\.\d min \(.+, 1 thread\)", row[3]) for row in rows), rows
    assert all(0 <= float(row[4].split(" ± ")[0]) <= 100 for row in rows)
    assert "maml_omniglot, 5-way 1-shot:" in markdown and "against the target 95%: not met" in markdown


@pytest.mark.slow
def test_omniglot_tests_each_setting_on_the_model_trained_with_its_ways_and_keeps_earlier_rows(tmp_path):
    base = ["--steps", "1", "--meta-batch", "2", "--test-tasks", "4", "--val-tasks", "2", "--minutes", "5"]
    run_report("omniglot", tmp_path, *base, "--recipes", "protonet_omniglot", "--settings", "5-way 1-shot")
    markdown = run_report("omniglot", tmp_path, *base, "--recipes", "maml_omniglot", "--also-20way", "maml_omniglot",
                          "--settings", "5-way 1-shot", "20-way 1-shot")
    rows = {(row[0], row[1]): row for row in table_rows(markdown)}
    assert set(rows) == {("maml_omniglot", "5-way 1-shot"), ("maml_omniglot", "20-way 1-shot"), ("protonet_omniglot", "5-way 1-shot")}
    assert rows["maml_omniglot", "20-way 1-shot"][2] == "20-way 1-shot"
    assert rows["maml_omniglot", "5-way 1-shot"][2] == "5-way 1-shot"
    assert markdown.count("- `python -m reports.omniglot") == 2  # each row names the command that made it


@pytest.mark.slow
def test_cross_alphabet(tmp_path):
    args = ["--steps", "2", "--meta-batch", "2", "--episodes", "4"]
    run_report("cross_alphabet", tmp_path, *args, "--recipes", "maml_omniglot", "protonet_omniglot", picture=False)
    # a second variant (more ways than the test, episodes within one alphabet) joins the first invocation's rows
    markdown = run_report(
        "cross_alphabet", tmp_path, *args, "--recipes", "protonet_omniglot", "--train-ways", "30", "--within", "--variant", "30way", picture=False
    )
    rows = {row[0]: row for row in table_rows(markdown)}
    assert set(rows) == {"maml_omniglot", "protonet_omniglot", "protonet_omniglot_30way"}
    assert rows["protonet_omniglot_30way"][2] == "30-way 1-shot, within one alphabet"
    assert rows["maml_omniglot"][2] == "5-way 1-shot" and rows["maml_omniglot"][3].startswith("2 × 2, ")
    assert all(re.fullmatch(r"\*\*\d+\.\d ± \d+\.\d\*\*", row[-1]) for row in rows.values())
    assert "Chance: 5%" in markdown and markdown.count("- `python -m reports.cross_alphabet") == 2
    config = (tmp_path / "runs" / "protonet_omniglot_30way" / ".hydra" / "config.yaml").read_text()
    assert "within: alphabet" in config and "n_ways: 30" in config


def test_cross_alphabet_tests_a_run_on_the_images_it_trained_on():
    from omegaconf import OmegaConf

    from reports.cross_alphabet import run_dataset  # imports torch and metaloop: kept out of the module's import

    dataset = {"_target_": "metaloop.tasks.Omniglot", "root": None, "full": False, "download": False, "image_size": 20}
    stored = OmegaConf.create({"task": {"datamodule": {"tasks": {"dataset": dataset}}}})
    # a run trained on 20 x 20 images is tested on 20 x 20 images (a 56-pixel run was once tested on 28-pixel ones)
    assert run_dataset(stored)[0][0].shape == (1, 20, 20)


#: the published row a slow test reruns: a short, step-bounded one (a time-bounded row's meta-steps depend on the machine)
REPRODUCED_ROW = "protonet_omniglot_200steps"


@pytest.mark.slow
def test_a_published_row_reproduces_within_its_interval(tmp_path):
    row = json.loads((ROOT / "reports" / "cross_alphabet.json").read_text())[REPRODUCED_ROW]
    command = shlex.split(row["command"])
    assert command[:3] == ["python", "-m", "reports.cross_alphabet"] and "--minutes" not in command
    markdown = run_report("cross_alphabet", tmp_path, *command[3:], picture=False)
    again = json.loads((tmp_path / "report" / "cross_alphabet.json").read_text())[REPRODUCED_ROW]
    assert again["budget"].split(",")[0] == row["budget"].split(",")[0]  # the same meta-steps and tasks
    assert abs(again["mean"] - row["mean"]) <= row["ci"], (again["all"], row["all"])
    assert f"**{again['all']}**" in markdown
