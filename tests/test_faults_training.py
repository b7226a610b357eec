"""Faults during training (issue 8, part 3).

- ``cryosift denoise train`` killed with SIGKILL in the middle of an epoch (after its first
  checkpoint) and continued with ``--resume`` ends with the same weights and validation losses
  as an uninterrupted run with the same seed.
- A full disk while a checkpoint or the model is saved: exit code 2, one line naming the file,
  the previous checkpoint and model byte for byte, no temporary file left.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cryosift.io import write_mrcs
from hostile_helpers import cli

ARGS = ["--method", "n2v", "--epochs", "3", "--batch-size", "16", "--crop", "32", "--depth", "2",
        "--width", "4", "--patience", "10", "--seed", "3", "--device", "cpu"]
ENV = {**os.environ, "CRYOSIFT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _particles(path: Path, n: int, box: int) -> Path:
    """Blobs of random brightness in Gaussian noise: something a denoiser can learn."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:box, :box] - box / 2
    clean = np.exp(-(x**2 + y**2) / (box / 3) ** 2)[None] * rng.uniform(0.5, 2.0, (n, 1, 1))
    write_mrcs(path, (clean + 0.5 * rng.normal(size=(n, box, box))).astype(np.float32), 2.0)
    return path


def _train(stack: Path, model_dir: Path, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "cryosift.cli.main", "-q", "denoise", "train", str(stack),
            "-o", str(model_dir), *ARGS, *extra]
    return subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path):
    stack = _particles(tmp_path / "particles.mrcs", 400, 32)
    full, part = tmp_path / "full", tmp_path / "part"
    reference = _train(stack, full)  # runs alongside the one that is killed
    victim = _train(stack, part)
    try:
        deadline = time.monotonic() + 300
        while not (part / "checkpoint.pt").exists():
            assert victim.poll() is None, victim.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.2)  # into the next epoch (one epoch is ~20 steps of 16 crops)
        assert victim.poll() is None, "training finished before it could be killed"
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=60)
        assert victim.returncode == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    ck = torch.load(part / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] < 2 and not (part / "training.json").exists()  # killed mid-run

    _finish(_train(stack, part, "--resume"))
    _finish(reference)

    a, b = (json.loads((d / "training.json").read_text()) for d in (full, part))
    assert [h["epoch"] for h in b["history"]] == [0, 1, 2]
    np.testing.assert_allclose([h["val_loss"] for h in b["history"]],
                               [h["val_loss"] for h in a["history"]], rtol=1e-5)
    assert a["best_epoch"] == b["best_epoch"]
    wa, wb = _weights(full / "model.pt"), _weights(part / "model.pt")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)
    ca = torch.load(full / "checkpoint.pt", weights_only=True)["model"]
    cb = torch.load(part / "checkpoint.pt", weights_only=True)["model"]
    for k in ca:
        torch.testing.assert_close(cb[k], ca[k], rtol=1e-5, atol=1e-6)
    assert not [p for p in part.iterdir() if p.name.startswith(".")]  # rerun cleaned up


@pytest.mark.parametrize("victim", ["checkpoint.pt", "model.pt"])
def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch, victim):
    stack = _particles(tmp_path / "p.mrcs", 24, 16)
    model_dir = tmp_path / "m"
    small = ["--method", "n2v", "--batch-size", "4", "--crop", "16", "--depth", "2", "--width",
             "2", "--device", "cpu", "--seed", "1", "-o", str(model_dir)]
    monkeypatch.setenv("CRYOSIFT_NO_PROGRESS", "1")
    assert cli(["-q", "denoise", "train", str(stack), "--epochs", "1", *small])[0] == 0
    # the same run with a larger budget: resume it, with the disk full at the next save
    ck = torch.load(model_dir / "checkpoint.pt", weights_only=True)
    ck["train_config"]["epochs"] = 2
    torch.save(ck, model_dir / "checkpoint.pt")
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    real_save = torch.save

    def full_disk_save(obj, f, *args, **kwargs):
        if Path(f).name.startswith(f".{victim}.tmp-"):
            Path(f).write_bytes(b"PK\x03\x04 half a file")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_save)
    if victim == "model.pt":  # saved only when validation improves: make sure it does
        ck["best_val"] = float("inf")
        real_save(ck, model_dir / "checkpoint.pt")
        before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    code, err = cli(["-q", "denoise", "train", str(stack), "--epochs", "2", "--resume", *small])
    monkeypatch.undo()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert f"{model_dir / victim}: cannot write (No space left on device)" in lines[0], lines[0]
    after = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    assert after == before  # byte for byte; no temporary file left behind
