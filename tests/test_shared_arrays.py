"""Model arrays mapped from one file per node (actors/providers/local/shared_arrays.py):
the same values as built, read-only, written once, rebuilt when the file is
not a whole one, and built in memory when there is no private directory."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest

from actors.providers.local.shared_arrays import shared_arrays
from actors.providers.local.silero_numpy import _Weights, model_path, prepared_weights


@pytest.fixture()
def private_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path / f"voice-actors-{os.getuid()}" / "arrays"


def arrays() -> dict[str, np.ndarray]:
    return {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([0.5], dtype=np.float32)}


def test_arrays_are_mapped_read_only_from_one_file_written_once(private_tmp):
    builds = []

    def build() -> dict[str, np.ndarray]:
        builds.append(1)
        return arrays()

    first = shared_arrays("x.f32", build)
    second = shared_arrays("x.f32", build)
    assert builds == [1]
    for got in (first, second):
        assert set(got) == {"a", "b"}
        np.testing.assert_array_equal(got["a"], arrays()["a"])
        np.testing.assert_array_equal(got["b"], arrays()["b"])
        assert not got["a"].flags.writeable
    assert (private_tmp / "x.f32").stat().st_mode & 0o077 == 0
    assert [p.name for p in private_tmp.iterdir()] == ["x.f32"]  # no temporary file left


@pytest.mark.parametrize("damage", [lambda b: b[:-4], lambda b: b"not one of these files", lambda b: b[:20]])
def test_a_file_that_is_not_a_whole_one_is_rebuilt(private_tmp, damage):
    shared_arrays("x.f32", arrays)
    path = private_tmp / "x.f32"
    path.write_bytes(damage(path.read_bytes()))
    got = shared_arrays("x.f32", arrays)
    np.testing.assert_array_equal(got["a"], arrays()["a"])
    assert shared_arrays("x.f32", lambda: pytest.fail("built again"))["b"][0] == 0.5


def test_a_new_version_removes_the_older_ones_and_a_mapping_of_one_stays_readable(private_tmp):
    old = shared_arrays("m-1.f32", arrays, supersedes="m-")
    shared_arrays("other.f32", arrays)
    new = shared_arrays("m-2.f32", lambda: {"a": arrays()["a"] * 2, "b": arrays()["b"]}, supersedes="m-")
    assert sorted(p.name for p in private_tmp.iterdir()) == ["m-2.f32", "other.f32"]
    np.testing.assert_array_equal(old["a"], arrays()["a"])  # still mapped after its file went
    np.testing.assert_array_equal(new["a"], arrays()["a"] * 2)


def test_without_a_private_directory_the_arrays_are_built_in_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    (tmp_path / f"voice-actors-{os.getuid()}").mkdir(mode=0o755)
    os.chmod(tmp_path / f"voice-actors-{os.getuid()}", 0o755)  # open to others: not used
    got = shared_arrays("x.f32", arrays)
    assert got["a"].flags.writeable
    assert not (tmp_path / f"voice-actors-{os.getuid()}" / "arrays").exists()


def test_a_file_that_cannot_be_written_leaves_the_arrays_in_memory(private_tmp, monkeypatch):
    import actors.providers.local.shared_arrays as shared

    def disk_full(path, arrays):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shared, "_write", disk_full)
    got = shared_arrays("x.f32", arrays)
    np.testing.assert_array_equal(got["a"], arrays()["a"])
    assert not (private_tmp / "x.f32").exists()


def test_silero_weights_from_the_shared_file_equal_those_read_from_the_model(private_tmp, monkeypatch):
    monkeypatch.setattr(_Weights, "_loaded", None)
    mapped = _Weights.get()
    direct = _Weights(prepared_weights(model_path()))
    assert len(list(private_tmp.iterdir())) == 1
    np.testing.assert_array_equal(mapped.stft, direct.stft)
    np.testing.assert_array_equal(mapped.lstm_w, direct.lstm_w)
    for (w1, b1, s1), (w2, b2, s2) in zip(mapped.convs, direct.convs):
        np.testing.assert_array_equal(w1, w2)
        np.testing.assert_array_equal(b1, b2)
        assert s1 == s2
    assert mapped.out_b == direct.out_b
