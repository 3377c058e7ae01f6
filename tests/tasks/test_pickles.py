"""metaloop.tasks.pickles: dataset pickles load; pickles that would run code are refused before anything runs."""

from __future__ import annotations

import io
import os
import pickle
from collections import OrderedDict, defaultdict

import numpy as np
import pytest

from metaloop.tasks.pickles import load_pickle


class RunsCode:
    """Unpickling this with plain pickle.load would call os.system."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_dataset_contents_round_trip(protocol, tmp_path):
    value = {
        "image_data": np.arange(24, dtype=np.uint8).reshape(2, 2, 2, 3),
        "labels": np.array([3, 4], dtype=np.int64),
        "class_dict": {"n01532829": [0, 1]},
        "scalar": np.float32(1.5),
        "misc": [1, 2.5, "s", b"b", (1,), {3}, frozenset({4}), True, None],
        "ordered": OrderedDict(a=1),
        "default": defaultdict(list, {"k": [1]}),
    }
    path = tmp_path / "data.pkl"
    path.write_bytes(pickle.dumps(value, protocol=protocol))
    loaded = load_pickle(path)
    assert np.array_equal(loaded["image_data"], value["image_data"]) and loaded["image_data"].dtype == np.uint8
    assert loaded["labels"].tolist() == [3, 4] and loaded["class_dict"] == {"n01532829": [0, 1]}
    assert loaded["scalar"] == np.float32(1.5) and loaded["misc"] == value["misc"]
    assert loaded["ordered"] == value["ordered"] and loaded["default"] == value["default"]


def test_python2_latin1_pickles_read_byte_for_byte():
    # a protocol-2 pickle as Python 2 writes it: a str (SHORT_BINSTRING) holding bytes >= 128, "__builtin__" names
    raw = b"\x80\x02}q\x00(U\x04dataq\x01U\x02\xff\x80q\x02U\x06labelsq\x03c__builtin__\nlist\nq\x04)\x85Rq\x05u."
    loaded = load_pickle(io.BytesIO(raw))
    assert loaded == {"data": "\xff\x80", "labels": []}


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_a_pickle_that_runs_code_is_refused(protocol, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "mini-imagenet-cache-train.pkl"
    path.write_bytes(pickle.dumps({"image_data": RunsCode()}, protocol=protocol))
    with pytest.raises(pickle.UnpicklingError, match=r"posix\.system|os\.system"):
        load_pickle(path)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("name", ["builtins\neval", "builtins\ngetattr", "numpy\nload", "subprocess\nPopen"])
def test_dangerous_globals_are_refused_by_name(name):
    raw = b"c" + name.encode() + b"\n(S'1'\ntR."
    with pytest.raises(pickle.UnpicklingError, match=name.replace("\n", r"\.") + ".*refusing"):
        load_pickle(io.BytesIO(raw))


def test_numpy_can_be_disallowed(tmp_path):
    path = tmp_path / "a.pkl"
    path.write_bytes(pickle.dumps(np.zeros(2)))
    with pytest.raises(pickle.UnpicklingError, match="numpy"):
        load_pickle(path, allow_numpy=False)
