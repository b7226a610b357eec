"""Faults while writing output (issue 8, part 3): a half-written output is never mistaken for a
finished one, and a full disk leaves the previous output intact.

- ``cryosift filter`` killed with SIGKILL in the middle of writing its stack: the final names
  hold nothing (first run) or the previous complete files, byte for byte; what is left is only
  hidden temporary files; a rerun produces the complete output.
- ENOSPC (simulated by monkeypatching the writers' file objects) while writing the image stack,
  the STAR file or the provenance JSON: exit code 2, one line naming the output file, the
  previous output byte for byte, and no temporary files left.
"""

from __future__ import annotations

import builtins
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import cryosift.io.mrc as mrc_module
from cryosift.errors import CryosiftError, OutputError
from cryosift.io import MrcsWriter, open_source, write_mrcs
from hostile_helpers import cli


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _stack(path: Path, n: int, box: int) -> Path:
    rng = np.random.default_rng(0)
    write_mrcs(path, rng.normal(size=(n, box, box)).astype(np.float32), 2.0)
    return path


# ------------------------------------------------------------------ SIGKILL mid-write


def _filter_argv(src: Path, out: Path, *flt: str) -> list[str]:
    return ["filter", str(src), "-o", str(out / "f.star"), *flt, "--chunk-size", "16"]


def _kill_mid_write(src: Path, out: Path) -> None:
    """Start a slow `cryosift filter` in a subprocess and SIGKILL it once its temporary stack
    exists (the data are being written); asserts it was still running when killed."""
    env = {**os.environ, "CRYOSIFT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "cryosift.cli.main", *_filter_argv(src, out, "--median", "5")]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob(".*f.mrcs.tmp-*")):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the filter never started writing"
            time.sleep(0.01)
        time.sleep(0.3)  # some chunks written, far from all (600 images of median 5)
        assert proc.poll() is None, "the filter finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _only_hidden_temporaries(out: Path, keep: set[str]) -> None:
    for p in out.iterdir():
        if p.name not in keep:
            assert p.name.startswith(".") and ".tmp-" in p.name, p.name


@pytest.mark.slow
def test_sigkill_mid_write_is_never_mistaken_for_a_finished_output(tmp_path):
    src = _stack(tmp_path / "in.mrcs", 600, 64)
    out = tmp_path / "out"
    out.mkdir()
    finals = {"f.star", "f.mrcs", "f_filter.json"}

    # 1. no previous output: after the kill, none of the final names exists
    _kill_mid_write(src, out)
    assert not any((out / name).exists() for name in finals), sorted(os.listdir(out))
    _only_hidden_temporaries(out, set())
    with pytest.raises(CryosiftError):  # nothing to read
        open_source(out / "f.star")

    # 2. a previous complete output: after the kill it is still there, byte for byte
    assert cli(_filter_argv(src, out, "--lowpass", "10"))[0] == 0
    previous = {k: v for k, v in _snapshot(out).items() if k in finals}
    assert set(previous) == finals
    _kill_mid_write(src, out)
    assert {k: v for k, v in _snapshot(out).items() if k in finals} == previous
    _only_hidden_temporaries(out, finals)
    assert len(open_source(out / "f.star")) == 600

    # 3. a rerun completes: the same images as an uninterrupted run elsewhere
    assert cli(_filter_argv(src, out, "--median", "5"))[0] == 0
    ref = tmp_path / "ref"
    assert cli(_filter_argv(src, ref, "--median", "5"))[0] == 0
    got = open_source(out / "f.star").images(slice(None))
    want = open_source(ref / "f.star").images(slice(None))
    assert got.shape == (600, 64, 64)
    np.testing.assert_array_equal(got, want)
    assert (out / "f.mrcs").read_bytes() == (ref / "f.mrcs").read_bytes()


# ------------------------------------------------------------------ disk full


class _FullDisk:
    """A file object that accepts ``budget`` bytes, writes part of the next write, then fails
    with ENOSPC like a full file system."""

    def __init__(self, fh, budget: int) -> None:
        self._fh, self._left = fh, budget

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) > self._left:
            self._fh.write(data[: self._left])
            self._left = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._left -= len(data)
        return self._fh.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._fh.close()

    def __getattr__(self, name):
        return getattr(self._fh, name)


def _full_disk_for(monkeypatch, target: str, budget: int) -> None:
    """Make writes of ``target`` (stack | star | json) fail with ENOSPC after ``budget`` bytes."""
    if target == "stack":  # MrcsWriter's positioned writes go through the module's open()
        def fake_open(*args, **kwargs):
            return _FullDisk(builtins.open(*args, **kwargs), budget)

        monkeypatch.setattr(mrc_module, "open", fake_open, raising=False)
        return
    real = Path.write_text
    suffix = {"star": ".star", "json": ".json"}[target]

    def write_text(self, text, *args, **kwargs):
        if ".tmp-" in self.name and self.suffix == suffix:
            real(self, text[: min(budget, len(text) // 2)], *args, **kwargs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)


@pytest.mark.parametrize("target,budget", [("stack", 0), ("stack", 1024 + 5000),
                                           ("stack", 1024 + 40 * 32 * 32 * 4), ("star", 100),
                                           ("json", 10)])
def test_disk_full_keeps_the_previous_output(tmp_path, monkeypatch, target, budget):
    src = _stack(tmp_path / "in.mrcs", 64, 32)
    out = tmp_path / "out"
    assert cli(_filter_argv(src, out, "--lowpass", "10"))[0] == 0
    previous = _snapshot(out)
    _full_disk_for(monkeypatch, target, budget)
    code, err = cli(_filter_argv(src, out, "--lowpass", "20"))
    monkeypatch.undo()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("cryosift: error: "), err
    assert "No space left on device" in lines[0]
    named = {"stack": "f.mrcs", "star": "f.star", "json": "f_filter.json"}[target]
    assert f"{out / named}:" in lines[0], lines[0]  # the final name, not a temporary one
    assert _snapshot(out) == previous  # byte for byte, and no temporary file left
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    # and the disk "has room again": the same command now succeeds
    assert cli(_filter_argv(src, out, "--lowpass", "20"))[0] == 0
    assert _snapshot(out)["f.mrcs"] != previous["f.mrcs"]


def test_disk_full_in_the_writer_api(tmp_path, monkeypatch):
    """MrcsWriter itself: OutputError naming the final file, previous file kept, no temp."""
    final = tmp_path / "s.mrcs"
    _stack(final, 8, 16)
    before = final.read_bytes()
    monkeypatch.setattr(mrc_module, "open",
                        lambda *a, **k: _FullDisk(builtins.open(*a, **k), 3000), raising=False)
    with pytest.raises(OutputError, match="No space left") as err, \
            MrcsWriter(final, 8, 16, 1.0) as w:
        for i in range(8):
            w.write(i, np.zeros((16, 16), np.float32))
    assert str(final) in str(err.value) and "\n" not in str(err.value)
    assert final.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.mrcs"]
