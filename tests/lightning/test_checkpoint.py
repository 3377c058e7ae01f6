"""metaloop.lightning.checkpoint: loading without running code, damaged files, and checkpoints that do not fit."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from metaloop.lightning.checkpoint import CheckpointError, check_fits, intact_sibling, load_checkpoint


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("zipped", [False, True])
def test_a_pickle_with_code_is_refused_and_not_run(tmp_path, protocol, zipped):
    marker, path = tmp_path / "pwned", tmp_path / "evil.ckpt"
    if zipped:
        torch.save({"state_dict": {}, "payload": _Payload(marker)}, path, pickle_protocol=protocol)
    else:
        path.write_bytes(pickle.dumps({"payload": _Payload(marker)}, protocol=protocol))
    with pytest.raises(CheckpointError, match=r"evil.ckpt holds pickled code or objects \(posix.system\)"):
        load_checkpoint(path)
    assert not marker.exists()


def test_a_lightning_style_checkpoint_loads(tmp_path):
    state = {"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {"inner_steps": 1, "betas": (0.9, 0.99)}, "epoch": 0}
    torch.save(state, tmp_path / "ok.ckpt")
    loaded = load_checkpoint(tmp_path / "ok.ckpt")
    assert torch.equal(loaded["state_dict"]["w"], torch.ones(2)) and loaded["hyper_parameters"]["betas"] == (0.9, 0.99)


def test_damaged_files_name_the_file_and_an_intact_sibling(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(3)}}, tmp_path / "good.ckpt")
    good = (tmp_path / "good.ckpt").read_bytes()
    for name, content in (("empty.ckpt", b""), ("half.ckpt", good[: len(good) // 2]), ("noise.ckpt", os.urandom(512))):
        (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=r"empty.ckpt is empty: .* an intact checkpoint in the same folder: .*good.ckpt"):
        load_checkpoint(tmp_path / "empty.ckpt")
    for name in ("half.ckpt", "noise.ckpt"):
        with pytest.raises(CheckpointError, match=rf"{name} is not a readable torch checkpoint .*good.ckpt"):
            load_checkpoint(tmp_path / name)
    assert intact_sibling(tmp_path / "empty.ckpt") == tmp_path / "good.ckpt"
    with pytest.raises(CheckpointError, match="absent.ckpt does not exist; checkpoints in that folder: empty.ckpt, good.ckpt"):
        load_checkpoint(tmp_path / "absent.ckpt")
    torch.save([1, 2], tmp_path / "list.ckpt")
    with pytest.raises(CheckpointError, match="holds a list, not a Lightning checkpoint dictionary"):
        load_checkpoint(tmp_path / "list.ckpt")


def test_check_fits_names_every_mismatch():
    module = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    saved = {f"{k}": v for k, v in nn.Sequential(nn.Linear(2, 4), nn.Linear(4, 1)).state_dict().items()}
    saved["extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as error:
        check_fits(module, {"state_dict": saved}, "run.ckpt")
    message = str(error.value)
    assert "the checkpoint has but this configuration lacks: extra" in message
    assert "0.weight (4, 2) in the checkpoint, (3, 2) here" in message
    adam = torch.optim.Adam(module.parameters())
    sgd_state = torch.optim.SGD(module.parameters(), lr=0.1).state_dict()
    with pytest.raises(CheckpointError, match="the outer optimizer differs: the checkpoint's has hyperparameters .*dampening"):
        check_fits(module, {"state_dict": module.state_dict(), "optimizer_states": [sgd_state]}, "run.ckpt", adam)
    check_fits(module, {"state_dict": module.state_dict(), "optimizer_states": [adam.state_dict()]}, "run.ckpt", adam)
