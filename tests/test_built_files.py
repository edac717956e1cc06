"""The build-once cache behind the search index and the sample database:
concurrent builders build once, a failed build leaves nothing, the name
follows the builder and the interpreter, and the files land where they should."""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

import pytest

from tool_gateway import built_files, corpus, sample_db


def test_concurrent_builders_build_once_and_failures_leave_nothing(tmp_path):
    builds = []

    def slow_build(tmp: Path) -> None:
        builds.append(tmp)
        time.sleep(0.3)  # long enough for every thread to wait on the lock
        tmp.write_bytes(b"built")

    path = tmp_path / "kind" / "file.sqlite"
    paths = []
    threads = [
        threading.Thread(target=lambda: paths.append(built_files.ensure_built(path, slow_build)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(builds) == 1 and paths == [path] * 4 and path.read_bytes() == b"built"
    assert sorted(p.name for p in path.parent.iterdir()) == [".build.lock", path.name]
    assert built_files.ensure_built(path, slow_build) == path and len(builds) == 1

    other = tmp_path / "other" / "file.sqlite"

    def broken_build(tmp: Path) -> None:
        tmp.write_bytes(b"half a file")
        raise built_files.BuildError("the builder died")

    with pytest.raises(built_files.BuildError, match="the builder died"):
        built_files.ensure_built(other, broken_build)
    assert [p.name for p in other.parent.iterdir()] == [".build.lock"]


def test_the_mode_is_what_the_caller_asks(tmp_path):
    path = built_files.ensure_built(tmp_path / "ro.sqlite", lambda t: t.write_bytes(b"x"), 0o444)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o444


def test_names_follow_the_builder_and_the_cache_folder(tmp_path, monkeypatch):
    a = built_files.versioned_path(corpus.__file__, "search", "corpus", "1", tmp_path)
    b = built_files.versioned_path(sample_db.__file__, "search", "corpus", "1", tmp_path)
    c = built_files.versioned_path(corpus.__file__, "search", "corpus", "2", tmp_path)
    assert len({a, b, c}) == 3 and a.parent == tmp_path / "search"
    assert corpus.index_path(tmp_path).parent == tmp_path / "search"
    assert sample_db.sample_db_path(tmp_path).parent == tmp_path / "database"
    monkeypatch.setenv("CONVEYOR_CACHE_DIR", str(tmp_path / "env"))
    assert sample_db.sample_db_path().parent == tmp_path / "env" / "database"
    assert corpus.index_path().parent == tmp_path / "env" / "search"


def test_the_modules_build_through_the_shared_cache(tmp_path):
    """Each module's ensure_* builds once into its own folder, read-only for
    the sample database."""
    calls = []

    def build(tmp: Path) -> None:
        calls.append(tmp)
        tmp.write_bytes(b"db")

    db = sample_db.ensure_sample_db(tmp_path, build=build)
    assert sample_db.ensure_sample_db(tmp_path, build=build) == db and len(calls) == 1
    assert stat.S_IMODE(os.stat(db).st_mode) == 0o444
    index = corpus.ensure_index(tmp_path, build=build)
    assert index.parent == tmp_path / "search" and len(calls) == 2
