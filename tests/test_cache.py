"""The cache of weight-file hashes: the manifest's sha256 of a local folder's weights is
computed once per file version, never trusted across a change."""

from __future__ import annotations

import hashlib
import os

import pytest

from probescope import cache
from probescope.manifest import weight_files_hash


@pytest.fixture
def store(monkeypatch, tmp_path):
    monkeypatch.setenv("PROBESCOPE_CACHE", str(tmp_path / "cache"))
    calls = []
    real = cache.sha256_file
    monkeypatch.setattr(cache, "sha256_file", lambda path, *a: calls.append(path) or real(path, *a))
    return calls


def _weights(folder, data: bytes):
    folder.mkdir(exist_ok=True)
    (folder / "model.safetensors").write_bytes(data)
    return folder / "model.safetensors"


def test_hash_is_read_once_then_remembered(store, tmp_path):
    path = _weights(tmp_path / "m", b"weights " * 1000)
    first = weight_files_hash(tmp_path / "m")
    second = weight_files_hash(tmp_path / "m")
    assert first == second == {"model.safetensors": hashlib.sha256(b"weights " * 1000).hexdigest()}
    assert store == [path]  # the second run read nothing


def test_a_changed_file_is_hashed_again_even_at_the_same_size(store, tmp_path):
    path = _weights(tmp_path / "m", b"a" * 64)
    weight_files_hash(tmp_path / "m")
    stat = path.stat()
    path.write_bytes(b"b" * 64)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # as a later write would
    assert weight_files_hash(tmp_path / "m") == {"model.safetensors": hashlib.sha256(b"b" * 64).hexdigest()}
    assert store == [path, path]


def test_a_corrupt_or_unwritable_store_only_costs_time(store, tmp_path, monkeypatch):
    path = _weights(tmp_path / "m", b"x" * 10)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / cache.HASHES).write_text("{not json")
    expected = {"model.safetensors": hashlib.sha256(b"x" * 10).hexdigest()}
    assert weight_files_hash(tmp_path / "m") == expected
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("PROBESCOPE_CACHE", str(blocker / "cache"))  # a folder under a file
    assert weight_files_hash(tmp_path / "m") == expected
    assert weight_files_hash(tmp_path / "m") == expected
    assert store == [path, path, path]


def test_files_that_are_gone_are_forgotten(store, tmp_path):
    _weights(tmp_path / "old", b"old")
    weight_files_hash(tmp_path / "old")
    (tmp_path / "old" / "model.safetensors").unlink()
    _weights(tmp_path / "new", b"new")
    weight_files_hash(tmp_path / "new")
    remembered = (tmp_path / "cache" / cache.HASHES).read_text()
    assert "new" in remembered and str(tmp_path / "old") not in remembered
