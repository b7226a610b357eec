"""`cryosift run`: normalise -> denoise -> screen -> classify -> evaluate -> report, resumable.

Every stage writes into its own folder of the run folder (``normalize/``, ``denoise/``,
``screen/``, ``classify/``, ``evaluate/``) with the library function that the matching
subcommand uses, so a stage's output is exactly what `cryosift filter`, `denoise apply`,
`screen apply` and `classify` would have written. ``run.json`` records, per stage, its
parameters, a fingerprint of its parameters and of the files it read (path, size, modification
time of the STAR and of every stack it points at), its outputs, status and time.

A rerun into the same folder skips a stage whose fingerprint is unchanged and whose outputs all
exist; a changed parameter or input reruns that stage and, because its outputs then change,
every stage after it. A folder that holds anything else (another input's run, unrelated files)
is refused before anything is written. A training stage interrupted mid-way resumes from its
last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryosift import __version__
from cryosift.errors import CryosiftError, InputError
from cryosift.io import atomic_write_json, atomic_write_text, open_source
from cryosift.pipeline.config import DENOISE_FITTED, DENOISE_TRAINED, RunConfig, to_toml

__all__ = ["STAGES", "RunResult", "run_pipeline"]

log = logging.getLogger("cryosift")

STAGES = ("normalize", "denoise", "screen", "classify", "evaluate")
MANIFEST = "run.json"
TRUTH_COLUMNS = ("cryosiftIsParticle", "cryosiftCleanImageName", "cryosiftTrueView")
#: weight averaging (EMA decay) of the denoiser trained by the pipeline, as in the benchmarks
RUN_EMA = 0.99


@dataclass
class RunResult:
    """Where the run's outputs are and what the stages did."""

    out: Path
    stages: list[dict[str, Any]]
    outputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] | None = None
    report: Path | None = None
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------
# fingerprints and the manifest


def _files_read(path: str | Path | None) -> list[Path]:
    """The files an image input is made of: a STAR and the stacks it points at, or a stack."""
    if path is None:
        return []
    src = open_source(path)
    return [Path(p) for p in [src.path, *getattr(src, "stack_paths", [])] if p is not None]


def _identity(paths: list[Path], root: Path) -> list[list[Any]]:
    """(path, size, mtime) per file; files inside the run folder by their relative path, so a
    moved or copied run folder is still recognised."""
    out = []
    root = root.resolve()
    for p in paths:
        st = p.stat()
        full = p.resolve()
        name = full.relative_to(root).as_posix() if full.is_relative_to(root) else str(full)
        out.append([name, st.st_size, st.st_mtime_ns])
    return out


def fingerprint(params: dict[str, Any], inputs: list[Path], root: Path) -> str:
    """Hash of a stage's parameters and of the identity of every file it reads."""
    blob = json.dumps({"params": params, "inputs": _identity(inputs, root)}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class _Manifest:
    """run.json: read at start (previous stage records), rewritten after every stage."""

    def __init__(self, out: Path, cfg: RunConfig, command: str, input_info: dict[str, Any]):
        self.out, self.path = out, out / MANIFEST
        self.previous: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            try:
                old = json.loads(self.path.read_text())
                self.previous = {s["name"]: s for s in old.get("stages", [])}
            except (ValueError, KeyError, TypeError) as err:
                raise InputError(f"unreadable run manifest ({err}); choose another -o",
                                 self.path) from err
        self.data: dict[str, Any] = {
            "cryosift_version": __version__,
            "command": command,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "input": input_info,
            "config": cfg.to_dict(),
            "stages": [],
            "total_seconds": 0.0,
        }

    def write(self) -> None:
        atomic_write_json(self.path, self.data)

    def record(self, entry: dict[str, Any]) -> None:
        stages = [s for s in self.data["stages"] if s["name"] != entry["name"]]
        self.data["stages"] = [*stages, entry]
        self.write()


def check_output_folder(out: Path, input_path: Path) -> None:
    """Refuse a folder that holds another run or unrelated files (nothing is touched)."""
    if out.exists() and not out.is_dir():
        raise InputError("output exists and is not a folder", out)
    if not out.exists() or not any(out.iterdir()):
        return
    manifest = out / MANIFEST
    if not manifest.is_file():
        raise InputError("output folder is not empty and holds no cryosift run; choose a new "
                         "or empty folder", out)
    try:
        previous = json.loads(manifest.read_text())["input"]["path"]
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"unreadable run manifest ({err}); choose another -o", manifest) from err
    if Path(previous).resolve() != input_path.resolve():
        raise InputError(f"holds the results of another run (input {previous}); choose another "
                         "-o (nothing was overwritten)", out)


# ---------------------------------------------------------------------------------------------
# the runner


class _Runner:
    def __init__(self, cfg: RunConfig, command: str):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.t0 = time.time()
        from cryosift.device import select_device

        self.device = select_device(cfg.device)
        src = open_source(cfg.input, pixel_size=cfg.pixel_size)  # refuses missing/mixed stacks
        if src.pixel_size is None:
            raise InputError("states no pixel size (MRC voxel size 0, no STAR optics); give "
                             "--pixel-size", src.path)
        self.box, self.pixel_size, self.n = src.box, float(src.pixel_size), len(src)
        meta = src.metadata
        self.truth = [c for c in TRUTH_COLUMNS if meta is not None and c in meta.columns]
        if cfg.pairs is not None:
            pairs = open_source(cfg.pairs, pixel_size=cfg.pixel_size)
            if len(pairs) != self.n or pairs.box != self.box:
                raise InputError(f"{len(pairs)} images of {pairs.box} px, but the input "
                                 f"{cfg.input} holds {self.n} of {self.box} px", cfg.pairs)
        self._check_references()
        check_output_folder(self.out, Path(cfg.input))
        self.out.mkdir(parents=True, exist_ok=True)
        self.manifest = _Manifest(self.out, cfg, command, {
            "path": str(Path(cfg.input).resolve()), "n_images": self.n, "box": self.box,
            "pixel_size": self.pixel_size, "ground_truth": self.truth,
        })
        atomic_write_text(self.out / "config.toml", to_toml(cfg))

    def _check_references(self) -> None:
        """Models and training sets named by the config must exist and fit the images (box,
        pixel size) before anything runs: a mismatch found at stage 3 would leave a half run."""
        cfg = self.cfg
        if cfg.denoise_sure and cfg.denoise in ("none", *DENOISE_FITTED):
            raise CryosiftError(f"denoise_sure needs a network denoiser, not {cfg.denoise!r}")
        if cfg.denoise not in ("auto", "none", *DENOISE_TRAINED, *DENOISE_FITTED):
            from cryosift.denoise.apply import NetworkFilter
            from cryosift.denoise.model_io import load_model

            model, meta = load_model(cfg.denoise, "cpu")
            try:
                # check() reads the box and pixel size only: any SNR will do for a conditioned
                # model (the stage estimates the stack's own when it runs)
                NetworkFilter(model, meta, torch.device("cpu"), snr=1.0).check(
                    self.pixel_size, self.box)
            except CryosiftError as err:
                raise InputError(f"denoising model {cfg.denoise}: {err}", cfg.input) from err
        if cfg.screen not in ("auto", "none"):
            from cryosift.screen.model_io import load_screener

            load_screener(cfg.screen, "cpu").check_images(self.box, self.pixel_size, cfg.input)
        for p in (cfg.screen_labels, cfg.screen_classes):
            if p is None:
                continue
            if not Path(p).is_file():
                raise InputError("file does not exist", p)
            train = open_source(p)
            if train.box != self.box:
                raise InputError(f"screening training images are {train.box} px but the input "
                                 f"{cfg.input} has {self.box} px", p)

    # -- one stage ------------------------------------------------------------------------------

    def stage(self, name: str, params: dict[str, Any], inputs: list[Path],
              outputs: dict[str, str], work: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Run ``work`` unless the previous run did it with the same fingerprint."""
        fp = fingerprint(params, inputs, self.out)
        prev = self.manifest.previous.get(name)
        complete = all((self.out / p).exists() for p in outputs.values())
        if prev and prev.get("fingerprint") == fp and prev.get("status") in ("done", "reused") \
                and complete:
            entry = {**prev, "status": "reused", "outputs": outputs}
            log.info("stage %s: unchanged, reusing %s", name, ", ".join(outputs.values()))
            self.manifest.record(entry)
            return entry
        resume = bool(prev and prev.get("fingerprint") == fp and prev.get("status") == "running")
        self.manifest.record({"name": name, "status": "running", "fingerprint": fp,
                              "params": params, "outputs": outputs})
        log.info("stage %s ...", name)
        t0 = time.time()
        extra: dict[str, Any] = {"resume": resume}
        work(extra)
        extra.pop("resume")
        entry = {"name": name, "status": "done", "fingerprint": fp, "params": params,
                 "outputs": outputs, "seconds": round(time.time() - t0, 2), **extra}
        self.manifest.record(entry)
        return entry

    def disabled(self, name: str, why: str) -> None:
        self.manifest.record({"name": name, "status": "disabled", "reason": why, "params": {},
                              "outputs": {}, "seconds": 0.0})

    # -- the stages -----------------------------------------------------------------------------

    def normalize(self) -> tuple[str, str | None]:
        """(images STAR, second-half STAR or None) for the stages after normalisation."""
        cfg = self.cfg
        if not cfg.normalize:
            self.disabled("normalize", "normalize = false")
            return cfg.input, cfg.pairs
        from cryosift.filters import make_filter
        from cryosift.filters.base import apply_filter_to_source

        outputs = {"star": "normalize/particles.star"}
        if cfg.pairs is not None:
            outputs["pairs"] = "normalize/particles_b.star"
        params = {"filter": "normalize", "pixel_size": cfg.pixel_size}

        def work(_: dict[str, Any]) -> None:
            for key, src in (("star", cfg.input), ("pairs", cfg.pairs)):
                if src is not None:
                    apply_filter_to_source(src, make_filter("normalize"), self.out / outputs[key],
                                           cfg.chunk_size, pixel_size=cfg.pixel_size)

        inputs = _files_read(cfg.input) + _files_read(cfg.pairs)
        self.stage("normalize", params, inputs, outputs, work)
        return str(self.out / outputs["star"]), (
            str(self.out / outputs["pairs"]) if cfg.pairs is not None else None
        )

    def denoise(self, images: str, pairs: str | None) -> str | None:
        cfg = self.cfg
        method = cfg.denoise
        if method == "auto":
            method = "n2n" if pairs is not None else "n2v"
        if method == "none":
            self.disabled("denoise", "denoise = none")
            return None
        outputs = {"star": "denoise/denoised.star"}
        params: dict[str, Any] = {"method": method}
        if cfg.denoise_tta:  # only when set, so the stage hashes of earlier runs still match
            params["tta"] = True
        if cfg.denoise_sure:
            params["sure"] = True
        if method in DENOISE_TRAINED:
            outputs["model"] = "denoise/model/model.pt"
            params.update(epochs=cfg.denoise_epochs, steps_per_epoch=cfg.denoise_steps_per_epoch,
                          max_images=cfg.denoise_max_images, seed=cfg.seed,
                          init=cfg.denoise_init, schedule="cosine", ema=RUN_EMA)
        model_dir = self.out / "denoise" / "model"

        def work(extra: dict[str, Any]) -> None:
            from cryosift.denoise.apply import denoise_source

            if method in DENOISE_FITTED:
                from cryosift.denoise.cwf import cwf_denoise_source

                cwf_denoise_source(images, self.out / outputs["star"], cfg.chunk_size,
                                   seed=cfg.seed)
                return
            model_ref: str | Path = method
            if method in DENOISE_TRAINED:
                extra["training"] = self._train_denoiser(method, images, pairs, model_dir,
                                                         extra["resume"])
                model_ref = model_dir
            denoise_source(model_ref, images, self.out / outputs["star"], self.device,
                           cfg.chunk_size, tta=cfg.denoise_tta, sure=cfg.denoise_sure)

        inputs = _files_read(images) + _files_read(pairs)
        if method not in (*DENOISE_TRAINED, *DENOISE_FITTED):
            from cryosift.denoise.model_io import resolve_model_path

            inputs.append(resolve_model_path(method))
        self.stage("denoise", params, inputs, outputs, work)
        return str(self.out / outputs["star"])

    def _train_denoiser(self, method: str, images: str, pairs: str | None, model_dir: Path,
                        resume: bool) -> dict[str, Any]:
        from cryosift.denoise.training import TrainConfig, batch_for_box, train_denoiser
        from cryosift.provenance import provenance_record

        cfg = self.cfg
        src = open_source(images)
        idx = np.arange(len(src))
        if len(idx) > cfg.denoise_max_images:
            rng = np.random.default_rng(cfg.seed)
            idx = np.sort(rng.choice(len(idx), cfg.denoise_max_images, replace=False))
        init = "" if cfg.denoise_init.lower() == "none" else cfg.denoise_init
        # a fixed budget, cosine learning rate and averaged weights, as the benchmarks train
        # (at low SNR the validation loss is too noisy to pick epochs by)
        # whole boxes (the network learns that the box edges are background), with as many
        # pixels per step as 32 crops of 64 px
        tcfg = TrainConfig(method=method, epochs=cfg.denoise_epochs, crop=0,
                           batch_size=batch_for_box(src.box),
                           steps_per_epoch=cfg.denoise_steps_per_epoch,
                           patience=cfg.denoise_epochs, seed=cfg.seed, init=init,
                           schedule="cosine", ema=RUN_EMA)
        resume = resume and (model_dir / "checkpoint.pt").is_file()
        summary = train_denoiser(
            src.images(idx), model_dir, tcfg,
            images_b=open_source(pairs).images(idx) if pairs is not None else None,
            device=self.device, resume=resume, pixel_size=src.pixel_size,
            provenance=provenance_record("run: denoise train", {"images": images,
                                                                "pairs": pairs}),
        )
        return {k: summary[k] for k in ("best_val_loss", "best_epoch") if k in summary}

    def screen(self, images: str) -> str | None:
        """Path of the kept particles' STAR, or None when screening is off."""
        cfg = self.cfg
        train = cfg.screen_labels is not None or cfg.good_classes is not None
        if cfg.screen == "none" or (cfg.screen == "auto" and not train):
            self.disabled("screen", "no screening model or training set given"
                          if cfg.screen == "auto" else "screen = none")
            return None
        outputs = {"dir": "screen", "scores": "screen/scores.star", "kept": "screen/kept.star",
                   "rejected": "screen/rejected.star"}
        params: dict[str, Any] = {"threshold": cfg.threshold, "keep_fraction": cfg.keep_fraction}
        inputs = _files_read(images)
        if train:
            outputs["model"] = "screen/model/model.pt"
            params.update(method=cfg.screen_method, labels=cfg.screen_labels,
                          label_column=cfg.screen_label_column, classes=cfg.screen_classes,
                          good_classes=cfg.good_classes, seed=cfg.seed)
            inputs += _files_read(cfg.screen_labels) + _files_read(cfg.screen_classes)
        else:
            from cryosift.screen.model_io import model_path

            params["model"] = str(Path(cfg.screen).resolve())
            inputs.append(model_path(cfg.screen))

        def work(extra: dict[str, Any]) -> None:
            from cryosift.provenance import provenance_record
            from cryosift.screen.apply import screen_source
            from cryosift.screen.model_io import load_screener

            model = self._train_screener() if train else cfg.screen
            screener = load_screener(model, self.device)
            record = provenance_record("run: screen apply", {"images": images, **params})
            res = screen_source(screener, images, self.out / "screen", cfg.threshold,
                                cfg.keep_fraction, max(cfg.chunk_size, 1024), provenance=record)
            extra.update(n_kept=int(res.kept.sum()), n_rejected=int((~res.kept).sum()),
                         threshold=float(res.threshold))

        self.stage("screen", params, inputs, outputs, work)
        return str(self.out / outputs["kept"])

    def _train_screener(self) -> Path:
        from cryosift.provenance import provenance_record
        from cryosift.screen.data import load_training_set
        from cryosift.screen.model_io import save_screener
        from cryosift.screen.preprocess import PreprocessConfig
        from cryosift.screen.screener import train_screener

        cfg = self.cfg
        ts = load_training_set(labels_star=cfg.screen_labels,
                               label_column=cfg.screen_label_column,
                               classes_star=cfg.screen_classes, good_classes=cfg.good_classes,
                               max_per_class=20000, seed=cfg.seed)
        log.info("screening training set: %s (%d particles, %d junk)", ts.description,
                 ts.counts["particles"], ts.counts["junk"])
        prep = PreprocessConfig(chain=cfg.screen_method == "rbm")
        screener = train_screener(ts.images, ts.labels, cfg.screen_method, None, prep,
                                  pixel_size=ts.pixel_size, device=self.device, seed=cfg.seed)
        folder = self.out / "screen" / "model"
        record = provenance_record("run: screen train", {"method": cfg.screen_method},
                                   training_set={"description": ts.description, **ts.counts})
        save_screener(folder, screener, record)
        return folder

    def classify(self, images: str) -> str | None:
        cfg = self.cfg
        if cfg.classes == 0:
            self.disabled("classify", "classes = 0")
            return None
        n = len(open_source(images))
        k = min(cfg.classes, n)
        if k < cfg.classes:
            log.warning("only %d particles: classifying into %d classes, not %d", n, k,
                        cfg.classes)
        if k < 2:
            self.disabled("classify", f"only {n} particle(s) left to classify")
            return None
        outputs = {"dir": "classify", "classes": "classify/classes.star",
                   "averages": "classify/class_averages.mrcs"}
        params = {"k": k, "method": cfg.classify_method, "features": cfg.classify_features,
                  "psi_step": cfg.psi_step, "iterations": cfg.iterations,
                  "align_box": cfg.align_box, "seed": cfg.seed}

        def work(_: dict[str, Any]) -> None:
            from cryosift.classify.run import classify_source

            classify_source(images, k, cfg.classify_method, cfg.classify_features,
                            self.out / "classify", psi_step=cfg.psi_step,
                            iterations=cfg.iterations, align_box=cfg.align_box, seed=cfg.seed,
                            device=str(self.device))

        self.stage("classify", params, _files_read(images), outputs, work)
        return str(self.out / outputs["classes"])

    def evaluate(self, images: str, pairs: str | None, denoised: str | None,
                 classes: str | None) -> dict[str, Any] | None:
        if not self.truth and pairs is None:
            self.disabled("evaluate", "no ground truth columns and no second half")
            return None
        outputs = {"metrics": "evaluate/metrics.json"}
        inputs = _files_read(images) + _files_read(pairs) + _files_read(denoised)
        scores = self.out / "screen" / "scores.star"
        for p in (scores if scores.exists() else None, classes):
            if p is not None:
                inputs.append(Path(p))
        metrics: dict[str, Any] = {}

        def work(_: dict[str, Any]) -> None:
            from cryosift.pipeline.groundtruth import evaluate_run

            metrics.update(evaluate_run(self.out, images, pairs, denoised,
                                        scores if scores.exists() else None, classes,
                                        self.cfg.threshold))
            atomic_write_json(self.out / outputs["metrics"], metrics)

        entry = self.stage("evaluate", {"threshold": self.cfg.threshold}, inputs, outputs, work)
        if entry["status"] == "reused":
            metrics.update(json.loads((self.out / outputs["metrics"]).read_text()))
        return metrics

    def run(self) -> RunResult:
        images, pairs = self.normalize()
        denoised = self.denoise(images, pairs)
        kept = self.screen(images)
        classes = self.classify(kept or images)
        metrics = self.evaluate(images, pairs, denoised, classes)
        seconds = time.time() - self.t0
        self.manifest.data["total_seconds"] = round(seconds, 2)
        self.manifest.write()
        report = None
        try:
            from cryosift.report.html import build_report
        except ImportError:  # pragma: no cover - the report module ships with the package
            build_report = None
        if build_report is not None:
            report = build_report(self.out)
        outputs = {k: v for s in self.manifest.data["stages"] for k, v in
                   ((f"{s['name']}.{key}", path) for key, path in s["outputs"].items())}
        return RunResult(self.out, self.manifest.data["stages"], outputs, metrics, report,
                         seconds)


def run_pipeline(cfg: RunConfig, command: str | None = None) -> RunResult:
    """Run (or resume) the pipeline described by ``cfg``; see the module docstring."""
    cfg.validate()
    if command is None:
        command = shlex.join(["cryosift", *sys.argv[1:]]) if sys.argv else "cryosift run"
    return _Runner(cfg, command).run()
