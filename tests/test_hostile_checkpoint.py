"""Hostile denoiser model and checkpoint files (issue 8, part 4): malicious pickles, zip bombs,
truncated and bit-flipped zips, random bytes, and well-formed files whose contents lie (wrong
types, NaN weights, absurd architectures that would need terabytes).

``load_model`` / ``train_denoiser(resume=True)`` refuse each with a CryosiftError whose one-line
message names the file, or (for damage that leaves a usable file) return a finite float32
network; a pickle's payload never runs (the file it would create never appears), and nothing is
allocated from sizes the file declares (loads run under a lowered RLIMIT_AS). Through
``cryosift denoise apply`` / ``denoise train --resume`` a refusal is exit code 2, one line on
stderr and no output.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import tempfile
import time
import warnings
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cryosift.denoise.model_io import FORMAT, load_model
from cryosift.denoise.networks import UNet, UNetConfig
from cryosift.denoise.training import TrainConfig, train_denoiser
from cryosift.errors import CryosiftError
from cryosift.io import write_mrcs
from hostile_helpers import (
    address_space_limit,
    cli_refuses,
    expect_refusal,
    outcome,
    record,
    write_tally,
)

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
ARCH = {"depth": 2, "width": 2, "kind": "unet"}


@pytest.fixture(scope="module", autouse=True)
def _tally(tmp_path_factory):
    yield
    write_tally(tmp_path_factory.getbasetemp())


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.detach().clone() for k, v in UNet(UNetConfig(**ARCH)).state_dict().items()}


STATE = _state()


def _saved(obj, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def _payload(**over) -> dict:
    p = {"format": FORMAT, "format_version": 1, "meta": {"architecture": dict(ARCH),
                                                          "method": "n2v"},
         "state_dict": dict(STATE)}
    p.update(over)
    return p


VALID = _saved(_payload())


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("ck-stack") / "stack.mrcs"
    write_mrcs(p, np.random.default_rng(0).normal(size=(4, 16, 16)), 1.0)
    return p


class _Case:
    def __init__(self, data: bytes, name: str = "hostile.pt") -> None:
        self._dir = tempfile.TemporaryDirectory()
        self.dir = Path(self._dir.name)
        self.path = self.dir / name
        self.path.write_bytes(data)
        self.out = self.dir / "out"
        self.out.mkdir()

    def __enter__(self) -> _Case:
        return self

    def __exit__(self, *exc) -> None:
        self._dir.cleanup()

    def apply_refused(self, stack: Path) -> None:
        cli_refuses(["-q", "denoise", "apply", str(stack), "--model", str(self.path), "-o",
                     str(self.out / "d.star"), "--device", "cpu"], self.out, self.path.name)


def _check_model(case: _Case, family: str, stack: Path) -> bool:
    with address_space_limit(512 << 20), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refused, result = outcome(lambda: load_model(case.path), case.path.name)
    record(family, refused)
    if refused:
        case.apply_refused(stack)
        return True
    net, meta = result
    assert isinstance(meta, dict)
    for t in net.state_dict().values():
        assert t.dtype == torch.float32 and bool(torch.isfinite(t).all())
    return False


# ------------------------------------------------------------------ malicious pickles


class _Evil:
    """Unpickling this would call ``how`` to create the marker file."""

    def __init__(self, marker: Path, how: str) -> None:
        self.marker, self.how = str(marker), how

    def __reduce__(self):
        if self.how == "open":
            return (open, (self.marker, "w"))
        if self.how == "system":
            return (os.system, (f"touch {self.marker}",))
        if self.how == "exec":
            return (exec, (f"open({self.marker!r}, 'w').close()",))
        if self.how == "eval":
            return (eval, (f"open({self.marker!r}, 'w')",))
        if self.how == "subprocess":
            return (subprocess.call, (["touch", self.marker],))
        return (Path.touch, (Path(self.marker),))


@settings(max_examples=60, **SETTINGS)
@given(
    how=st.sampled_from(["open", "system", "exec", "eval", "subprocess", "touch"]),
    container=st.sampled_from(["pickle", "torch-zip", "torch-legacy"]),
    protocol=st.integers(0, pickle.HIGHEST_PROTOCOL),
    where=st.sampled_from(["top", "meta", "state_dict", "tensor-slot"]),
)
def test_malicious_pickles_never_run(stack, how, container, protocol, where):
    with tempfile.TemporaryDirectory() as d:
        marker = Path(d) / "pwned"
        evil = _Evil(marker, how)
        if where == "top":
            obj = evil
        elif where == "meta":
            obj = _payload(meta={"architecture": dict(ARCH), "x": evil})
        elif where == "state_dict":
            obj = _payload(state_dict={**STATE, "extra": evil})
        else:
            obj = _payload(state_dict={**STATE, next(iter(STATE)): evil})
        if container == "pickle":
            data = pickle.dumps(obj, protocol=protocol)
        else:
            buf = io.BytesIO()
            torch.save(obj, buf, pickle_protocol=max(protocol, 2),
                       _use_new_zipfile_serialization=container == "torch-zip")
            data = buf.getvalue()
        assert not marker.exists()
        with _Case(data) as case:
            err = expect_refusal(lambda: load_model(case.path), case.path.name)
            assert not marker.exists(), "the pickle's payload ran"
            assert "refused" in str(err) or "corrupt" in str(err)
            record("checkpoint: malicious pickle", True)
            case.apply_refused(stack)
            assert not marker.exists(), "the pickle's payload ran"


# ------------------------------------------------------------------ zip damage


def _rezip(src: bytes, replace: dict[str, tuple[bytes | None, int]]) -> bytes:
    """Copy a zip, replacing entries by (data or None for unchanged, compress_type)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(src)) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            data, ctype = replace.get(info.filename.split("/", 1)[1], (None, zipfile.ZIP_STORED))
            zout.writestr(zipfile.ZipInfo(info.filename), zin.read(info) if data is None
                          else data, compress_type=ctype)
    return out.getvalue()


def _bomb(entry_bytes: int) -> bytes:
    """The valid model with its pickle-referenced storage 'data/0' replaced by a deflated entry
    of ``entry_bytes`` zeros (a few hundred kB on disk), streamed so building it is cheap."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(VALID)) as zin, \
            zipfile.ZipFile(out, "w", compresslevel=1) as zout:
        for info in zin.infolist():
            if info.filename.endswith("/data/0"):
                zi = zipfile.ZipInfo(info.filename)
                zi.compress_type = zipfile.ZIP_DEFLATED
                with zout.open(zi, "w", force_zip64=True) as fh:
                    block = bytes(1 << 20)
                    for _ in range(entry_bytes >> 20):
                        fh.write(block)
            else:
                zout.writestr(zipfile.ZipInfo(info.filename), zin.read(info))
    return out.getvalue()


def test_zip_bomb_refused_without_inflating(stack):
    """256 MB of zeros deflated into a ~1 MB model file: refused from the zip directory alone,
    in well under a second, with the address space capped 128 MB above its size (inflating
    the entry would fail with MemoryError, not pass unnoticed)."""
    data = _bomb(256 << 20)
    assert len(data) < 2 << 20
    with _Case(data) as case:
        t0 = time.perf_counter()
        with address_space_limit(128 << 20):
            err = expect_refusal(lambda: load_model(case.path), case.path.name)
        assert time.perf_counter() - t0 < 1.0
        assert "compressed" in str(err)
        record("checkpoint: zip bomb", True)
        case.apply_refused(stack)


@settings(max_examples=20, **SETTINGS)
@given(entry=st.sampled_from(["data.pkl", "version", "byteorder", "data/0", "data/1"]),
       ctype=st.sampled_from([zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]))
def test_compressed_entries_refused(stack, entry, ctype):
    with zipfile.ZipFile(io.BytesIO(VALID)) as z:
        names = {i.filename.split("/", 1)[1] for i in z.infolist()}
    entry = entry if entry in names else "data.pkl"
    with _Case(_rezip(VALID, {entry: (None, ctype)})) as case:
        expect_refusal(lambda: load_model(case.path), case.path.name)
        record("checkpoint: compressed zip entry", True)
        case.apply_refused(stack)


@settings(max_examples=60, **SETTINGS)
@given(keep=st.floats(0.0, 0.9999))
def test_truncated_model_files_refused(stack, keep):
    cut = int(len(VALID) * keep)
    with _Case(VALID[:cut]) as case:
        expect_refusal(lambda: load_model(case.path), case.path.name)
        record("checkpoint: truncated zip", True)
        case.apply_refused(stack)


@settings(max_examples=80, **SETTINGS)
@given(flips=st.lists(st.tuples(st.floats(0.0, 0.9999), st.integers(0, 255)), min_size=1,
                      max_size=8))
def test_bit_flipped_model_files_refused_or_usable(stack, flips):
    raw = bytearray(VALID)
    for where, value in flips:
        raw[int(where * len(raw))] = value
    with _Case(bytes(raw)) as case:
        _check_model(case, "checkpoint: byte flips", stack)


@settings(max_examples=30, **SETTINGS)
@given(data=st.binary(max_size=4000), zip_magic=st.booleans())
def test_random_bytes_refused(stack, data, zip_magic):
    with _Case((b"PK\x03\x04" if zip_magic else b"") + data) as case:
        expect_refusal(lambda: load_model(case.path), case.path.name)
        record("checkpoint: random bytes", True)
        case.apply_refused(stack)


# ------------------------------------------------------------------ contents that lie

_ODD = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
                 st.floats(allow_nan=True), st.text(max_size=5),
                 st.lists(st.integers(), max_size=2))
_ARCH_VALUE = st.one_of(st.integers(-5, 20), st.sampled_from([10**6, 10**9, 2**62, 2**31]), _ODD)


@st.composite
def _lying_payload(draw):
    """A well-formed torch file whose payload is wrong in one or more ways."""
    p = _payload()
    state = dict(STATE)
    keys = sorted(state)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["format", "meta", "arch", "arch_key", "drop", "extra",
                                     "shape", "dtype", "nonfinite", "not_tensor", "state_type",
                                     "huge_arch"]))
        if kind == "format":
            p["format"] = draw(st.one_of(_ODD, st.just("cryosift-denoiser ")))
        elif kind == "meta":
            p["meta"] = draw(_ODD)
        elif kind == "arch" and isinstance(p["meta"], dict):
            p["meta"] = {**p["meta"], "architecture": draw(_ODD)}
        elif kind in ("arch_key", "huge_arch") and isinstance(p["meta"], dict) \
                and isinstance(p["meta"].get("architecture"), dict):
            key = draw(st.sampled_from(["depth", "width", "kind"]))
            value = draw(_ARCH_VALUE if kind == "arch_key" else
                         st.sampled_from([10**4, 10**6, 10**9, 2**40]))
            p["meta"] = {**p["meta"], "architecture": {**p["meta"]["architecture"], key: value}}
        elif kind == "drop" and state:
            state.pop(draw(st.sampled_from(sorted(state))))
        elif kind == "extra":
            state[draw(st.text(max_size=8))] = torch.zeros(draw(st.integers(0, 3)))
        elif kind == "shape":
            k = draw(st.sampled_from(keys))
            state[k] = torch.zeros(draw(st.lists(st.integers(0, 4), max_size=4)))
        elif kind == "dtype":
            k = draw(st.sampled_from(keys))
            dt = draw(st.sampled_from([torch.float64, torch.float16, torch.bfloat16, torch.int64,
                                       torch.uint8, torch.bool, torch.complex64]))
            state[k] = STATE[k].to(dt)
        elif kind == "nonfinite":
            k = draw(st.sampled_from(keys))
            t = STATE[k].clone()
            t.view(-1)[0] = draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
            state[k] = t
        elif kind == "not_tensor":
            state[draw(st.sampled_from(keys))] = draw(_ODD)
        elif kind == "state_type":
            p["state_dict"] = draw(_ODD)
            return p
    p["state_dict"] = state
    return p


@settings(max_examples=120, **SETTINGS)
@given(payload=_lying_payload(), legacy=st.booleans())
def test_lying_payloads_refused_or_consistent(stack, payload, legacy):
    """Wrong format tags, metadata and architectures of every type (including ones that would
    need terabytes: depth or width 10^9), weights missing, extra, misshapen, of the wrong
    dtype, NaN/Inf or not tensors at all."""
    with _Case(_saved(payload, legacy)) as case:
        if not _check_model(case, "checkpoint: lying payload", stack):
            arch = payload["meta"]["architecture"]
            assert (arch.get("depth", 4), arch.get("width", 16)) == (2, 2)


# ------------------------------------------------------------------ resume checkpoints

TRAIN = dict(method="n2v", epochs=1, batch_size=4, crop=16, depth=2, width=2, patience=5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(images, checkpoint dict) of a one-epoch run on 8 tiny images."""
    d = tmp_path_factory.mktemp("ck-train")
    images = np.random.default_rng(1).normal(size=(8, 16, 16)).astype(np.float32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRYOSIFT_NO_PROGRESS", "1")
        train_denoiser(images, d, TrainConfig(**TRAIN))
    ck = torch.load(d / "checkpoint.pt", weights_only=True)
    return images, ck


@st.composite
def _damaged_checkpoint(draw, ck):
    ck = dict(ck)
    for _ in range(draw(st.integers(1, 2))):
        key = draw(st.sampled_from(sorted(ck)))
        if draw(st.booleans()):
            ck.pop(key, None)
        else:
            ck[key] = draw(st.one_of(_ODD, st.just(torch.zeros(3)), st.just({"x": 1})))
    ck.setdefault("model", STATE)  # keep it recognisable as a checkpoint half the time
    if draw(st.booleans()):
        ck["train_config"] = asdict(TrainConfig(**TRAIN))
    return ck


@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_damaged_resume_checkpoints_refused(trained, data):
    images, good = trained
    ck = data.draw(_damaged_checkpoint(good))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "checkpoint.pt"
        torch.save(ck, path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            refused, result = outcome(
                lambda: train_denoiser(images, Path(d), TrainConfig(**TRAIN), resume=True),
                "checkpoint.pt")
        record("checkpoint: damaged resume checkpoint", refused)
        if not refused:  # a damage that did not matter (say, an extra key): training finished
            assert "history" in result


def test_cli_resume_from_hostile_checkpoint(tmp_path, stack):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    marker = tmp_path / "pwned"
    with open(model_dir / "checkpoint.pt", "wb") as fh:
        pickle.dump({"model": _Evil(marker, "open"), "train_config": {}}, fh)
    before = sorted(os.listdir(model_dir))
    line = cli_refuses(["-q", "denoise", "train", str(stack), "--method", "n2v", "-o",
                        str(model_dir), "--epochs", "1", "--crop", "16", "--depth", "2",
                        "--width", "2", "--batch-size", "2", "--device", "cpu", "--resume"],
                       tmp_path / "nothing-here", "checkpoint.pt")
    assert "refused" in line
    assert sorted(os.listdir(model_dir)) == before and not marker.exists()
    record("checkpoint: malicious resume via CLI", True)


def test_refusals_are_cryosift_errors():
    assert issubclass(type(expect_refusal(lambda: load_model("/nonexistent/m.pt"), "m.pt")),
                      CryosiftError)
