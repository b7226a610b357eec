"""The per-image stages on Dask (cryosift.engine): the same outputs as in-process for filters,
`denoise apply`, `screen apply` and classification features; a worker killed mid-run loses and
duplicates nothing; --scheduler reaches clusters by address and by scheduler file; bad
--scheduler values fail in one line with nothing written."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from cryosift.engine import (
    AUTO_LOCAL_MIN_IMAGES,
    DaskEngine,
    check_scheduler,
    open_engine,
)
from cryosift.errors import CryosiftError
from cryosift.filters import FilterChain, apply_filter_to_source, make_filter
from cryosift.filters.base import BatchContext, Filter
from cryosift.io import image_names, make_optics_table, open_source, write_mrcs, write_star
from sim_helpers import run_cli

distributed = pytest.importorskip("distributed")

N, BOX, PX, CHUNK = 300, 32, 2.5, 32
QUIET_HTTP = {"dashboard": False, "dashboard_address": "127.0.0.1:0"}  # not on port 8787


def _images(n: int = N, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Half blobs of random size and position (particles), half noise; (images, labels)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:BOX, :BOX] - BOX // 2
    labels = np.arange(n) % 2
    imgs = rng.normal(size=(n, BOX, BOX)).astype(np.float32)
    for i in np.flatnonzero(labels):
        cy, cx = rng.integers(-3, 4, 2)
        w = rng.uniform(10, 40)
        imgs[i] += 2.5 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / w)
    return imgs, labels


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """particles.star (RELION 3.1 with CTF columns) -> particles.mrcs, N images of 32 px."""
    root = tmp_path_factory.mktemp("engine_data")
    imgs, labels = _images()
    write_mrcs(root / "particles.mrcs", imgs, PX)
    rng = np.random.default_rng(3)
    parts = pd.DataFrame({
        "rlnImageName": image_names(N, "particles.mrcs"),
        "rlnDefocusU": rng.uniform(1e4, 2e4, N),
        "rlnDefocusV": rng.uniform(1e4, 2e4, N),
        "rlnDefocusAngle": rng.uniform(0, 180, N),
        "cryosiftIsParticle": labels,
        "rlnOpticsGroup": 1,
    })
    write_star(root / "particles.star", parts, make_optics_table(PX, BOX))
    return root / "particles.star"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A LocalCluster of 2 single-threaded worker processes, with a scheduler file."""
    folder = tmp_path_factory.mktemp("cluster")
    sched_file = folder / "scheduler.json"
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
        scheduler_kwargs={"scheduler_file": str(sched_file), **QUIET_HTTP},
    ) as lc:
        yield SimpleNamespace(scheduler_address=lc.scheduler_address, scheduler_file=sched_file)


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("CRYOSIFT_NO_PROGRESS", "1")
    monkeypatch.delenv("CRYOSIFT_SCHEDULER", raising=False)


def _same_bytes(a: Path, b: Path) -> None:
    assert a.read_bytes() == b.read_bytes(), f"{a} and {b} differ"


def _chain() -> FilterChain:
    return FilterChain([make_filter("phaseflip"), make_filter("lowpass", cutoff_A=8.0),
                        make_filter("normalize")])


# ----------------------------------------------------------------------------- scheduler values


def test_scheduler_values_are_parsed_and_refused_in_one_line(tmp_path):
    assert check_scheduler(None).kind == "auto"
    assert check_scheduler("threads").kind == "threads"
    assert check_scheduler("LOCAL").kind == "local"
    assert check_scheduler("tcp://10.0.0.1:8786").value == "tcp://10.0.0.1:8786"
    with pytest.raises(CryosiftError, match="scheduler file not found"):
        check_scheduler(str(tmp_path / "nope.json"))
    with pytest.raises(CryosiftError, match="is not auto, threads, local"):
        check_scheduler("my-cluster")
    with open_engine("auto", n_images=AUTO_LOCAL_MIN_IMAGES - 1) as engine:
        assert engine is None  # small stacks stay in-process
    with open_engine("local", n_images=10**6, file_based=False) as engine:
        assert engine is None  # arrays in memory cannot be opened by workers
    with pytest.raises(CryosiftError, match="--workers"), open_engine("local", workers=0):
        pass


# ------------------------------------------------------------------- same results as in-process


def test_filter_on_dask_equals_in_process(dataset, cluster, tmp_path):
    a = apply_filter_to_source(dataset, _chain(), tmp_path / "a" / "out.star", CHUNK)
    b = apply_filter_to_source(dataset, _chain(), tmp_path / "b" / "out.star", CHUNK,
                               scheduler=cluster.scheduler_address)
    _same_bytes(a.with_suffix(".mrcs"), b.with_suffix(".mrcs"))
    _same_bytes(a, b)
    assert sorted(os.listdir(b.parent)) == ["out.mrcs", "out.star", "out_filter.json"]


@pytest.mark.parametrize(("tta", "sure"), [(False, False), (True, False), (False, True)])
def test_denoise_apply_on_dask_equals_in_process(dataset, cluster, tmp_path, tta, sure):
    from cryosift.denoise.apply import denoise_source

    a = denoise_source("general", dataset, tmp_path / "a" / "den.star", chunk_size=CHUNK,
                       tta=tta, sure=sure)
    b = denoise_source("general", dataset, tmp_path / "b" / "den.star", chunk_size=CHUNK,
                       scheduler=cluster.scheduler_address, tta=tta, sure=sure)
    _same_bytes(a.with_suffix(".mrcs"), b.with_suffix(".mrcs"))
    _same_bytes(a, b)


@pytest.fixture(scope="module")
def cnn_model(tmp_path_factory):
    from cryosift.screen import PreprocessConfig, train_screener
    from cryosift.screen.cnn import CNNConfig
    from cryosift.screen.model_io import save_screener

    imgs, labels = _images(200, seed=5)
    s = train_screener(imgs, labels, "cnn", CNNConfig(epochs=2), PreprocessConfig(),
                       pixel_size=PX)
    folder = tmp_path_factory.mktemp("cnn_model")
    save_screener(folder, s)
    return folder


def test_screen_apply_on_dask_equals_in_process(dataset, cluster, cnn_model, tmp_path):
    from cryosift.io import read_star
    from cryosift.screen.apply import load_and_screen

    a = load_and_screen(cnn_model, dataset, tmp_path / "a", chunk_size=CHUNK)
    b = load_and_screen(cnn_model, dataset, tmp_path / "b", chunk_size=CHUNK,
                        scheduler=str(cluster.scheduler_file))
    assert np.array_equal(a.scores, b.scores) and np.array_equal(a.kept, b.kept)
    for name in ("scores.star", "kept.star", "rejected.star"):
        _same_bytes(tmp_path / "a" / name, tmp_path / "b" / name)
    assert len(read_star(tmp_path / "b" / "scores.star").particles) == N


@pytest.fixture(scope="module")
def big_dataset(tmp_path_factory) -> Path:
    """2,100 images with CTF columns: rotinv chunks are multiples of 1,024 images."""
    root = tmp_path_factory.mktemp("engine_big")
    n = 2100
    write_mrcs(root / "big.mrcs", _images(n, seed=7)[0], PX)
    rng = np.random.default_rng(4)
    parts = pd.DataFrame({
        "rlnImageName": image_names(n, "big.mrcs"),
        "rlnDefocusU": rng.uniform(1e4, 2e4, n),
        "rlnDefocusV": rng.uniform(1e4, 2e4, n),
        "rlnDefocusAngle": rng.uniform(0, 180, n),
        "rlnOpticsGroup": 1,
    })
    write_star(root / "big.star", parts, make_optics_table(PX, BOX))
    return root / "big.star"


@pytest.mark.parametrize("kind", ["raw", "pca", "rotinv"])
def test_classification_features_on_dask_equal_in_process(big_dataset, cluster, kind):
    from cryosift.classify.features import compute_features, features_on_engine, phase_flip
    from cryosift.io import merged_metadata

    src = open_source(big_dataset)
    meta = merged_metadata(src.table)
    images = phase_flip(src.images(slice(None)), meta, PX)
    ref = compute_features(images, kind, PX, None, seed=0, n_components=20)
    with open_engine(cluster.scheduler_address) as engine:
        got = features_on_engine(src, kind, engine, phase_flip=True, n_components=20,
                                 chunk_size=500)
    assert got.shape == ref.shape
    assert np.array_equal(got, ref)


# ---------------------------------------------------------------------- a worker killed mid-run


class SlowDouble(Filter):
    """2x + 1, slowly (one sleep per chunk), leaving a marker file per call: lets the test kill a
    worker while it is busy."""

    name = "slow-double"
    threaded = False

    def __init__(self, markers: str, delay: float) -> None:
        self.markers, self.delay = markers, delay

    def params(self):
        return {"delay": self.delay}

    def apply(self, images: np.ndarray, ctx: BatchContext) -> np.ndarray:
        Path(self.markers, f"{os.getpid()}-{time.monotonic_ns()}").touch()
        time.sleep(self.delay)
        return images * 2 + 1


@pytest.mark.slow
def test_worker_killed_mid_run_loses_and_duplicates_nothing(dataset, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    # the run without the kill: in-process, without the sleep (the same images)
    ref = apply_filter_to_source(dataset, SlowDouble(str(markers), 0.0),
                                 tmp_path / "ref" / "out.star", 16)
    n_chunks = -(-N // 16)
    for p in markers.iterdir():
        p.unlink()
    filt = SlowDouble(str(markers), 0.4)

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None, scheduler_kwargs=QUIET_HTTP) as lc, \
            distributed.Client(lc, set_as_default=False) as client:
        pids = set(DaskEngine(client, "address").worker_pids().values())
        assert len(pids) == 2
        result: dict = {}

        def run() -> None:
            try:
                result["out"] = apply_filter_to_source(
                    dataset, filt, tmp_path / "dask" / "out.star", 16,
                    scheduler=lc.scheduler_address)
            except BaseException as err:  # reported by the main thread
                result["error"] = err

        worker = threading.Thread(target=run)
        worker.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # both workers busy, a few chunks done
            calls = sorted(markers.iterdir(), key=lambda p: int(p.name.split("-")[1]))
            if {int(p.name.split("-")[0]) for p in calls} == pids and len(calls) >= 4:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the workers never started")
        victim = int(calls[-1].name.split("-")[0])  # the worker that started a chunk last
        os.kill(victim, signal.SIGKILL)
        worker.join(300)
        assert not worker.is_alive(), "the run did not finish after a worker was killed"
        after = set(DaskEngine(client, "address").worker_pids().values())
    assert "error" not in result, result.get("error")
    assert victim not in after  # the kill happened (the nanny started a new worker)
    out = result["out"]
    _same_bytes(ref.with_suffix(".mrcs"), out.with_suffix(".mrcs"))
    _same_bytes(ref, out)
    calls = list(markers.iterdir())
    assert len(calls) >= n_chunks  # every chunk ran; the killed one possibly twice
    print(f"{len(calls)} chunk runs for {n_chunks} chunks; killed worker {victim}")
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # staging removed
    images = open_source(out).images(slice(None))
    assert len(images) == N
    assert np.array_equal(images, open_source(dataset).images(slice(None)) * 2 + 1)


# ---------------------------------------------------------------------------- the command line


def test_cli_filter_on_scheduler_address_and_file(dataset, cluster, tmp_path):
    base = ["-q", "filter", str(dataset), "--lowpass", "8", "--normalize", "--chunk-size", "50"]
    assert run_cli([*base, "-o", str(tmp_path / "t" / "out.star"), "--scheduler",
                    "threads"]) == 0
    assert run_cli([*base, "-o", str(tmp_path / "a" / "out.star"), "--scheduler",
                    cluster.scheduler_address]) == 0
    assert run_cli([*base, "-o", str(tmp_path / "f" / "out.star"), "--scheduler",
                    str(cluster.scheduler_file)]) == 0
    for d in ("a", "f"):
        _same_bytes(tmp_path / "t" / "out.mrcs", tmp_path / d / "out.mrcs")
        _same_bytes(tmp_path / "t" / "out.star", tmp_path / d / "out.star")


def test_cli_denoise_and_screen_apply_on_a_cluster(dataset, cluster, cnn_model, tmp_path):
    from cryosift.io import read_star

    for sched, d in (("threads", "t"), (str(cluster.scheduler_file), "c")):
        assert run_cli(["-q", "denoise", "apply", str(dataset), "--model", "general", "-o",
                        str(tmp_path / d / "den.star"), "--device", "cpu", "--chunk-size", "64",
                        "--scheduler", sched]) == 0
        assert run_cli(["-q", "screen", "apply", str(dataset), "--model", str(cnn_model), "-o",
                        str(tmp_path / d / "screened"), "--device", "cpu", "--chunk-size", "64",
                        "--scheduler", sched]) == 0
    _same_bytes(tmp_path / "t" / "den.mrcs", tmp_path / "c" / "den.mrcs")
    a = read_star(tmp_path / "t" / "screened" / "scores.star").particles
    b = read_star(tmp_path / "c" / "screened" / "scores.star").particles
    assert np.array_equal(a["cryosiftParticleScore"], b["cryosiftParticleScore"])


@pytest.mark.slow
def test_cli_local_cluster_of_two_workers(dataset, tmp_path):
    import json

    base = ["-q", "filter", str(dataset), "--lowpass", "8", "--chunk-size", "64"]
    assert run_cli([*base, "-o", str(tmp_path / "t" / "out.star")]) == 0  # auto: threads
    assert run_cli([*base, "-o", str(tmp_path / "l" / "out.star"), "--scheduler", "local",
                    "--workers", "2"]) == 0
    _same_bytes(tmp_path / "t" / "out.mrcs", tmp_path / "l" / "out.mrcs")
    rec = json.loads((tmp_path / "l" / "out_filter.json").read_text())
    assert rec["parameters"]["execution"] == {"engine": "dask", "scheduler": "local",
                                              "workers": 2, "threads": 2}
    rec = json.loads((tmp_path / "t" / "out_filter.json").read_text())
    assert rec["parameters"]["execution"] == {"engine": "threads"}


@pytest.mark.parametrize("command", ["filter", "denoise", "screen"])
def test_cli_bad_scheduler_fails_in_one_line_and_writes_nothing(
    dataset, cnn_model, tmp_path, capsys, monkeypatch, command
):
    monkeypatch.setenv("CRYOSIFT_DASK_TIMEOUT", "2")
    out = tmp_path / "out"
    argv = {
        "filter": ["filter", str(dataset), "--lowpass", "8", "-o", str(out / "f.star")],
        "denoise": ["denoise", "apply", str(dataset), "--model", "general", "--device", "cpu",
                    "-o", str(out / "d.star")],
        "screen": ["screen", "apply", str(dataset), "--model", str(cnn_model), "--device",
                   "cpu", "-o", str(out / "screened")],
    }[command]
    for bad, fragment in (
        ("tcp://127.0.0.1:9", "cannot start or reach tcp://127.0.0.1:9"),
        (str(tmp_path / "missing.json"), "scheduler file not found"),
        ("nowhere", "is not auto, threads, local"),
    ):
        code = run_cli(["-q", *argv, "--scheduler", bad])
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        assert len(err.splitlines()) == 1 and err.startswith("cryosift: error:"), err
        assert fragment in err, err
        assert not out.exists() or not list(out.rglob("*")), list(out.rglob("*"))


def test_cli_classify_features_on_a_cluster_equal_in_process(big_dataset, cluster, tmp_path):
    """kmeans on pca features computed on the cluster: the same classes and averages."""
    from cryosift.io import read_star

    outs = {}
    for name, sched in (("threads", "threads"), ("dask", cluster.scheduler_address)):
        outs[name] = tmp_path / name
        assert run_cli(["classify", str(big_dataset), "-k", "3", "--features", "pca",
                        "--n-components", "10", "--scheduler", sched,
                        "-o", str(outs[name])]) == 0
    a = read_star(outs["threads"] / "classes.star").particles["rlnClassNumber"]
    b = read_star(outs["dask"] / "classes.star").particles["rlnClassNumber"]
    assert np.array_equal(a.to_numpy(), b.to_numpy())
    avg_a = open_source(outs["threads"] / "class_averages.mrcs").images(slice(None))
    avg_b = open_source(outs["dask"] / "class_averages.mrcs").images(slice(None))
    np.testing.assert_allclose(avg_a, avg_b, atol=1e-5)
    prov = (outs["dask"] / "classify.json").read_text()
    assert '"engine": "dask"' in prov
