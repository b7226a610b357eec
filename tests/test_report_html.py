"""`cryosift report`: the self-contained HTML page of a pipeline run folder.

The run folder is built here with the existing commands (simulate the shipped GroEL-GroES model,
normalize, denoise with the shipped general model, screen with a tiny RBM, classify with
k-means) plus run.json and evaluate/metrics.json written by hand after the pipeline's contract,
so these tests do not depend on `cryosift run`.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cryosift.errors import OutputError
from cryosift.io import open_source, read_star
from cryosift.metrics import (
    clustering_metrics,
    contingency,
    frc,
    frc_resolution,
    image_metrics,
    screening_metrics,
)
from cryosift.report.html import build_report
from cryosift.simulate import SimulationConfig, simulate
from sim_helpers import run_cli

PX, BOX, N, K = 3.0, 48, 200, 5
DATA_URI = 'src="data:image/png;base64,'


def _curve(a: np.ndarray, b: np.ndarray) -> tuple[dict, float]:
    f, c = frc(a, b)
    return {"frequency_per_A": (f / PX).tolist(), "curve": c.tolist()}, frc_resolution(
        f, c, 0.5, PX)


def _build_run(root: Path) -> Path:
    """A complete run folder after the `cryosift run` contract, with ground truth."""
    import torch

    structure = Path(str(resources.files("cryosift") / "data" / "1aon.pdb.gz"))
    cfg = SimulationConfig(n_images=N, box=BOX, pixel_size=PX, snr=0.1, views=4,
                           junk_fraction=0.2, pairs=True, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("CRYOSIFT_NO_PROGRESS", "1")
            sim = simulate(structure, root / "sim", cfg, command="test")
            run = root / "run"
            norm = run / "normalize" / "particles.star"
            den = run / "denoise" / "denoised.star"
            steps = [
                ["filter", str(sim.star), "-o", str(norm), "--normalize"],
                ["denoise", "apply", str(norm), "--model", "general", "-o", str(den),
                 "--device", "cpu"],
                ["screen", "train", "--labels", str(norm), "--method", "rbm", "--epochs", "5",
                 "--hidden", "32", "--device", "cpu", "-o", str(root / "rbm")],
                ["screen", "apply", str(norm), "--model", str(root / "rbm"), "-o",
                 str(run / "screen"), "--device", "cpu"],
                ["classify", str(run / "screen" / "kept.star"), "-k", str(K), "--method",
                 "kmeans", "--features", "pca", "-o", str(run / "classify"), "--device", "cpu"],
            ]
            for argv in steps:
                assert run_cli(["-q", *argv]) == 0, argv
    finally:
        torch.set_num_threads(threads)

    # evaluate/metrics.json as the pipeline's evaluate stage writes it
    src = open_source(norm)
    meta = src.metadata
    is_part = meta["cryosiftIsParticle"].to_numpy().astype(bool)
    raw = src.images(slice(None))[is_part]
    clean = open_source(sim.clean).images(slice(None))[is_part]
    dn = open_source(den).images(slice(None))[is_part]
    raw_frc, raw_res = _curve(raw, clean)
    den_frc, den_res = _curve(dn, clean)
    half_frc, half_res = _curve(open_source(sim.particles).images(slice(None)),
                                open_source(sim.particles_b).images(slice(None)))
    scores = read_star(run / "screen" / "scores.star").particles
    classes = read_star(run / "classify" / "classes.star").particles
    view = classes["cryosiftTrueView"].to_numpy().astype(int)
    cls = classes["rlnClassNumber"].to_numpy().astype(int)
    ok = view >= 0
    table, views, cnums = contingency(view[ok], cls[ok])
    metrics = {
        "ground_truth": ["cryosiftCleanImageName", "cryosiftIsParticle", "cryosiftTrueView"],
        "denoise": {
            "raw": {**image_metrics(raw, clean), "frc_resolution_A": raw_res},
            "denoised": {**image_metrics(dn, clean), "frc_resolution_A": den_res},
            "frc": {"raw": raw_frc, "denoised": den_frc},
        },
        "halves": {"snr": 0.1, "frc_resolution_A": half_res, "frc": half_frc},
        "screen": screening_metrics(scores["cryosiftIsParticle"].to_numpy().astype(int),
                                    scores["cryosiftParticleScore"].to_numpy(float), 0.5),
        "classify": {**clustering_metrics(view[ok], cls[ok]),
                     "confusion": {"views": views.tolist(), "classes": cnums.tolist(),
                                   "matrix": table.tolist()}},
    }
    (run / "evaluate").mkdir()
    (run / "evaluate" / "metrics.json").write_text(json.dumps(metrics, indent=1))
    stages = [
        {"name": "normalize", "status": "done", "seconds": 0.4,
         "params": {"filter": "normalize"}, "outputs": {"star": "normalize/particles.star"}},
        {"name": "denoise", "status": "done", "seconds": 0.5,
         "params": {"model": "general", "chunk_size": 256},
         "outputs": {"star": "denoise/denoised.star"}},
        {"name": "screen", "status": "reused", "seconds": 3.1,
         "params": {"method": "rbm", "threshold": 0.5, "epochs": 5},
         "outputs": {"dir": "screen", "scores": "screen/scores.star",
                     "kept": "screen/kept.star", "rejected": "screen/rejected.star"}},
        {"name": "classify", "status": "done", "seconds": 1.2,
         "params": {"k": K, "method": "kmeans", "features": "pca"},
         "outputs": {"dir": "classify", "classes": "classify/classes.star",
                     "averages": "classify/class_averages.mrcs"}},
        {"name": "evaluate", "status": "done", "seconds": 0.3, "params": {"threshold": 0.5},
         "outputs": {"metrics": "evaluate/metrics.json"}},
    ]
    info = {
        "cryosift_version": "0.1.0",
        "command": f"cryosift run {sim.star} -o {run} --classes {K} <b>&amp;",
        "created": "2026-01-01T12:00:00+0000",
        "input": {"path": str(sim.star), "n_images": N, "box": BOX, "pixel_size": PX},
        "config": {"classes": K, "threshold": 0.5, "denoise_model": "general",
                   "screen_method": "rbm", "seed": 0},
        "stages": stages,
        "total_seconds": 5.5,
    }
    (run / "run.json").write_text(json.dumps(info, indent=1))
    return run


def shared_run(tmp_path_factory) -> Path:
    """The run folder, built once per test session (and per xdist worker)."""
    root = tmp_path_factory.getbasetemp() / "report_run"
    run = root / "run"
    if not (run / "run.json").is_file():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        _build_run(root)
    return run


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    return shared_run(tmp_path_factory)


@pytest.fixture(scope="session")
def full_report(run_dir, tmp_path_factory):
    out = build_report(run_dir, tmp_path_factory.mktemp("report") / "report.html")
    return out, out.read_text(encoding="utf-8")


class _Checker(HTMLParser):
    """Tag balance (void elements aside), ids and every img's attributes."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
            "source", "track", "wbr"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.ids: list[str] = []
        self.imgs: list[dict] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "img":
            self.imgs.append(a)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()


def _check_html(text: str) -> _Checker:
    assert text.startswith("<!DOCTYPE html>")
    p = _Checker()
    p.feed(text)
    p.close()
    assert not p.errors and not p.stack, (p.errors, p.stack)
    assert len(p.ids) == len(set(p.ids)), "duplicate ids"
    return p


def _no_external(text: str) -> None:
    for pattern in (r'src="(?!data:image/png;base64,)', r'href="(?!#)', r"url\(", r"<link\b",
                    r"@import", r"https?://", r"<iframe", r"<object"):
        assert not re.search(pattern, text), pattern


def test_full_report_has_every_section_and_embeds_every_figure(run_dir, full_report):
    path, text = full_report
    p = _check_html(text)
    _no_external(text)
    for sid in ("summary", "headline-scores", "denoise", "frc", "screen", "classify",
                "provenance", "figure-check"):
        assert sid in p.ids, sid
    # every image is an embedded PNG that decodes; names are unique; the page says how many
    assert p.imgs and all(im["src"].startswith("data:image/png;base64,") for im in p.imgs)
    for im in p.imgs:
        Image.open(io.BytesIO(base64.b64decode(im["src"].split(",", 1)[1]))).verify()
        assert im.get("alt") and im.get("data-name")
    names = [im["data-name"] for im in p.imgs]
    assert len(names) == len(set(names))
    assert f'data-figures-expected="{len(p.imgs)}"' in text
    assert text.count(DATA_URI) == len(p.imgs)
    # before/after: input, denoised and clean rows of 8 true particles; FRC plot; metrics
    assert sum(n.startswith("denoise-") for n in names) == 3 * 8
    assert "input (normalized)" in text and "clean (ground truth)" in text
    assert "frc" in names and "denoised vs clean" in text and "half A vs half B" in text
    assert "SSIM" in text and "FRC-0.5 resolution (Å" in text and "SNR estimate" in text
    # screening: histogram, 8 kept + 8 rejected, counts and the 2x2 confusion table
    assert "score-histogram" in names
    assert sum(n.startswith("screen-") for n in names) == 16
    n_kept = len(read_star(run_dir / "screen" / "kept.star").particles)
    assert f"<b>{n_kept}</b> of {N} images kept" in text
    assert "true particle" in text and "ROC-AUC" in text
    # classification: one figure per class, largest first, with counts and percentages
    stats = json.loads((run_dir / "classify" / "class_stats.json").read_text())["classes"]
    caps = re.findall(r"class (\d+) · (\d+) \(([\d.]+) %\)", text)
    assert [int(c) for c, _, _ in caps] == [c["class"] for c in stats]
    assert [int(s) for _, s, _ in caps] == sorted((c["size"] for c in stats), reverse=True)
    assert sum(n.startswith("class-") for n in names) == K
    assert 'class="confusion"' in text and "ACC (best" in text and "NMI" in text
    # provenance: every stage with status and time; text from run.json is escaped
    for stage in ("normalize", "denoise", "screen", "classify", "evaluate"):
        assert f"<b>{stage}</b>" in text
    assert '<span class="status reused">reused</span>' in text
    assert "&lt;b&gt;&amp;amp;" in text and "<b>&amp;" not in text
    assert "<details>" in text and "denoise_model" in text
    # nothing went wrong anywhere, nothing says a stage is missing, and the page is small
    assert 'class="problem"' not in text and 'class="absent"' not in text
    assert len(text) < 2_000_000


def test_default_path_and_cli(run_dir, tmp_path, capsys):
    out = tmp_path / "sub" / "r.html"
    out.parent.mkdir()
    assert run_cli(["report", str(run_dir), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {out}"
    assert out.read_text().count(DATA_URI) > 30
    assert not list(out.parent.glob(".*")), "temporary file left behind"
    partial = tmp_path / "copy"
    shutil.copytree(run_dir, partial)
    assert build_report(partial) == partial / "report.html"
    assert (partial / "report.html").is_file()
    with pytest.raises(OutputError, match="is a folder; give a file name"):
        build_report(partial, tmp_path)


def _rewrite(run: Path, keep: dict[str, dict | None], metrics: bool = True) -> None:
    info = json.loads((run / "run.json").read_text())
    stages = []
    for st in info["stages"]:
        if st["name"] in keep:
            stages.append({**st, **(keep[st["name"]] or {})})
    info["stages"] = stages
    (run / "run.json").write_text(json.dumps(info))
    if not metrics:
        shutil.rmtree(run / "evaluate", ignore_errors=True)


def test_partial_runs_say_what_is_missing(run_dir, tmp_path):
    # only normalize and screen ran; denoise disabled; no evaluation; classify absent
    run = tmp_path / "a" / "run"
    run.mkdir(parents=True)
    for sub in ("normalize", "screen"):
        shutil.copytree(run_dir / sub, run / sub)
    shutil.copy(run_dir / "run.json", run / "run.json")
    _rewrite(run, {"normalize": None, "screen": None,
                   "denoise": {"status": "disabled", "reason": "--no-denoise", "outputs": {}}},
             metrics=False)
    text = build_report(run).read_text()
    _check_html(text)
    _no_external(text)
    assert 'class="problem"' not in text
    assert "the &#x27;denoise&#x27; stage was disabled in this run (--no-denoise)" in text
    assert "Classification: not run (run.json has no &#x27;classify&#x27; stage)" in text
    assert "no ground-truth evaluation in this run" in text
    # the screen stage still draws everything, its truth metrics computed from scores.star
    assert "score-histogram" in text and "computed from scores.star" in text
    # the clean stack lay outside the copied folder: said plainly, the other rows still shown
    assert "Ground-truth images:" in text and "input (normalized)" in text
    assert 'data-name="denoise-0-0"' in text and 'data-name="denoise-1-0"' not in text
    assert text.count(DATA_URI) == 8 + 1 + 16

    # no stages at all, and an input that no longer exists
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "run.json").write_text(json.dumps({"input": {"path": "gone.star"}}))
    text = build_report(bare).read_text()
    _check_html(text)
    assert 'class="problem"' not in text and DATA_URI not in text
    assert "the input gone.star cannot be found" in text
    assert text.count("not run") >= 5 and 'data-figures-expected="0"' in text


def test_missing_and_corrupt_outputs_do_not_lose_the_report(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "classify" / "class_averages.mrcs").unlink()  # stage says done, file is gone
    (run / "screen" / "scores.star").write_text("data_particles\nloop_\n_rlnImageName #1\n"
                                                 "not a number\tx\ty\n")  # corrupt
    (run / "evaluate" / "metrics.json").write_text("{not json")
    text = build_report(run).read_text()
    _check_html(text)
    assert "Class averages: the &#x27;classify&#x27; stage output " \
           "classify/class_averages.mrcs is missing from the run folder." in text
    assert text.count('class="problem"') == 1  # the screening section, and nothing else
    assert "metrics.json is unreadable" in text
    assert "classification ACC" in text  # computed from classes.star instead
    assert "No FRC curves: metrics.json is unreadable" in text
    assert 'data-name="denoise-1-0"' in text  # input and denoised rows still drawn


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "run folder does not exist"),
        ("file", "is not a folder"),
        ("empty", "no run.json: not a cryosift run folder"),
        ("badjson", "run.json: not valid JSON"),
        ("list", "run.json: does not hold a JSON object"),
        ("outdir", "is a directory"),
    ],
)
def test_bad_input_one_line_exit_2_no_output(tmp_path, capsys, case, message):
    run = tmp_path / "run"
    out = tmp_path / "out.html"
    if case == "file":
        run.write_text("x")
    elif case != "missing":
        run.mkdir()
    if case == "badjson":
        (run / "run.json").write_text('{"stages": [')
    elif case in ("list", "outdir"):
        (run / "run.json").write_text("[]" if case == "list" else "{}")
    if case == "outdir":
        out.mkdir()
    code = run_cli(["report", str(run), "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("cryosift: error:"), err
    assert message in err, err
    assert out.is_dir() if case == "outdir" else not out.exists()
    assert not (run / "report.html").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p for p in ("run", "out.html") if (tmp_path / p).exists())
