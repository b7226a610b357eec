"""`cryosift report`: one self-contained HTML page about a pipeline run folder.

The page embeds every figure as a base64 PNG data URI and loads nothing else (no scripts,
fonts or styles from elsewhere), so it can be mailed, archived and opened offline. It reads the
run folder written by `cryosift run` (see ``run.json``): every stage is optional, and a stage
that did not run, was disabled or whose outputs are missing is named as such in its section
instead of failing the whole report. A section that cannot be drawn for another reason (a
corrupt file, say) shows the problem in a red box; the rest of the page is still written.

A short inline script at the end checks, once the page has loaded, that every ``<img>`` decoded
(``complete && naturalWidth > 0``) and writes the result into ``<body data-figures-total=...
data-figures-loaded=... data-figures-broken="names">`` and the footer: that is what the headless
browser test reads.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cryosift import __version__
from cryosift.errors import InputError, OutputError
from cryosift.io import atomic_write_text, open_source, parse_image_name, read_star
from cryosift.report.figures import data_uri, frc_png, score_histogram_png, tile_png

log = logging.getLogger("cryosift")

STAGES = ("normalize", "denoise", "screen", "classify", "evaluate")
USABLE = ("done", "reused")
N_PANEL = 8  # particles in the before/after panel and in each screening montage row
SCORE_COLUMN = "cryosiftParticleScore"


class _Unavailable(Exception):  # noqa: N818 - a plain notice, not an error
    """A section cannot be drawn because something it needs is absent (said plainly, in grey)."""


# --------------------------------------------------------------------------------------------
# small formatting helpers


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v: Any, digits: int = 4) -> str:
    """A number for a table cell: ints as they are, floats to `digits` significant figures."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if math.isnan(v):
            return "—"
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        return f"{v:.{digits}g}"
    return str(v)


def _seconds(v: Any) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        return "—"
    if v < 60:
        return f"{v:.1f} s"
    m, s = divmod(float(v), 60)
    return f"{int(m)} min {s:.0f} s" if m < 60 else f"{int(m // 60)} h {int(m % 60)} min"


def _value_cell(v: Any) -> str:
    """A parameter value: scalars formatted, lists and dicts as compact JSON."""
    if isinstance(v, (dict, list, tuple)):
        return f"<code>{_e(json.dumps(v, default=str))}</code>"
    if isinstance(v, str):
        return f"<code>{_e(v)}</code>" if v else "<i>empty</i>"
    return _e(_fmt(v, 6))


_LABELS = {
    "accuracy": "accuracy", "precision": "precision", "recall": "recall", "f1": "F1",
    "roc_auc": "ROC-AUC", "threshold": "threshold", "acc": "ACC (best class ↔ view matching)",
    "nmi": "NMI", "ari": "ARI", "pair_precision": "pair precision", "pair_recall": "pair recall",
    "pair_f1": "pair F1", "n_particles": "true particles classified",
    "n_junk_in_classes": "junk images classified", "snr": "SNR estimate",
    "frc_threshold": "FRC threshold", "n_images": "images",
    "halves_resolution": "FRC-0.143 resolution (Å)",
}


def _metrics_table(m: dict, keys: Sequence[str] | None = None, extra: bool = False) -> str:
    """Named metrics (``keys``, then with ``extra`` any other numbers) with readable labels."""
    names = [k for k in (keys or []) if _num(m, k) is not None]
    if extra:
        names += [k for k in m if k not in names and _num(m, k) is not None]
    rows = "".join(f"<tr><th>{_e(_LABELS.get(k, k))}</th><td>{_e(_fmt(m[k]))}</td></tr>"
                   for k in names)
    return f'<table class="kv"><tbody>{rows}</tbody></table>' if rows else ""


def _kv_table(items: Iterable[tuple[str, Any]], cls: str = "kv") -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_value_cell(v)}</td></tr>" for k, v in items)
    return f'<table class="{cls}"><tbody>{rows}</tbody></table>' if rows else "<p>none</p>"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "data") -> str:
    """A table; header texts are escaped, cells are HTML already."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _notice(text: str) -> str:
    return f'<p class="absent">{_e(text)}</p>'


def _num(d: dict | None, key: str) -> float | None:
    v = (d or {}).get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


# --------------------------------------------------------------------------------------------
# the run folder


class _Run:
    """run.json, its stages, metrics.json and the count of figures put on the page."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir
        self.info = _load_run_json(run_dir)
        self.stages: dict[str, dict] = {}
        stages = self.info.get("stages")
        for st in stages if isinstance(stages, list) else []:
            if isinstance(st, dict) and isinstance(st.get("name"), str):
                self.stages[st["name"]] = st
        self.metrics, self.metrics_note = self._load_metrics()
        self.n_figures = 0

    # stages ---------------------------------------------------------------------------------

    def status(self, name: str) -> str:
        st = self.stages.get(name)
        return "absent" if st is None else str(st.get("status", "unknown"))

    def usable(self, name: str) -> bool:
        return self.status(name) in USABLE

    def why_not(self, name: str, what: str) -> str:
        status = self.status(name)
        if status == "absent":
            return f"{what}: not run (run.json has no '{name}' stage)."
        reason = self.stages[name].get("reason")
        because = f" ({reason})" if isinstance(reason, str) and reason else ""
        if status == "disabled":
            return f"{what}: the '{name}' stage was disabled in this run{because}."
        if status == "running":
            return f"{what}: the '{name}' stage did not finish (interrupted run?)."
        return f"{what}: the '{name}' stage has status '{status}', so it has no outputs to show."

    def output(self, name: str, key: str, required: bool = True) -> Path | None:
        """Path of output `key` of stage `name` (relative paths are inside the run folder)."""
        outs = self.stages.get(name, {}).get("outputs") or {}
        rel = outs.get(key) if isinstance(outs, dict) else None
        if not rel:
            if required:
                raise _Unavailable(f"run.json names no '{key}' output of the '{name}' stage.")
            return None
        path = Path(rel) if Path(rel).is_absolute() else self.dir / rel
        if not path.exists():
            if required:
                raise _Unavailable(f"the '{name}' stage output {rel} is missing from the run "
                                   "folder.")
            return None
        return path

    def stage_dir(self, name: str) -> Path | None:
        d = self.output(name, "dir", required=False)
        if d is not None:
            return d
        for key in ("scores", "classes", "star", "metrics"):
            p = self.output(name, key, required=False)
            if p is not None:
                return p.parent
        return None

    # inputs ---------------------------------------------------------------------------------

    def input_path(self) -> tuple[Path, str]:
        """The images the pipeline worked on: normalize's output if it ran, else run.input."""
        if self.usable("normalize"):
            p = self.output("normalize", "star", required=False)
            if p is not None:
                return p, "input (normalized)"
        inp = self.info.get("input") if isinstance(self.info.get("input"), dict) else {}
        raw = inp.get("path")
        if not raw:
            raise _Unavailable("run.json names no input path.")
        p = Path(str(raw))
        for cand in (p, self.dir / p) if not p.is_absolute() else (p,):
            if cand.exists():
                return cand, "input"
        raise _Unavailable(f"the input {raw} cannot be found (moved or deleted?).")

    # metrics --------------------------------------------------------------------------------

    def _load_metrics(self) -> tuple[dict, str]:
        path = None
        if self.usable("evaluate"):
            path = self.output("evaluate", "metrics", required=False)
        if path is None and (self.dir / "evaluate" / "metrics.json").is_file():
            path = self.dir / "evaluate" / "metrics.json"
        if path is None:
            return {}, "no ground-truth evaluation in this run (" + (
                self.why_not("evaluate", "evaluate").split(": ", 1)[1].rstrip(".") + ")")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            log.warning("report: %s is unreadable (%s); ground-truth metrics left out", path, err)
            return {}, f"{path.name} is unreadable ({err})"
        if not isinstance(data, dict):
            return {}, f"{path.name} does not hold a JSON object"
        return data, ""

    def section_metrics(self, key: str) -> dict | None:
        m = self.metrics.get(key)
        return m if isinstance(m, dict) else None

    # figures --------------------------------------------------------------------------------

    def img(self, png: bytes, name: str, alt: str, cls: str = "", title: str = "") -> str:
        self.n_figures += 1
        attrs = f' class="{_e(cls)}"' if cls else ""
        attrs += f' title="{_e(title)}"' if title else ""
        return (f'<img src="{data_uri(png)}" alt="{_e(alt)}" data-name="{_e(name)}"{attrs}>')


def _load_run_json(run_dir: Path) -> dict:
    if not run_dir.exists():
        raise InputError("run folder does not exist", run_dir)
    if not run_dir.is_dir():
        raise InputError("is not a folder (give the run folder that holds run.json)", run_dir)
    path = run_dir / "run.json"
    if not path.is_file():
        raise InputError("no run.json: not a cryosift run folder", run_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read ({err})", path) from err
    except ValueError as err:
        raise InputError(f"not valid JSON ({err})", path) from err
    if not isinstance(data, dict):
        raise InputError("does not hold a JSON object", path)
    return data


# --------------------------------------------------------------------------------------------
# images referenced by name (ground-truth clean images)


def _resolve_stack(name: str, star_path: Path) -> Path:
    """Like StarSource: relative to the STAR's folder, else its parents, else the cwd."""
    p = Path(name)
    if p.is_absolute():
        return p
    if (star_path.parent / p).exists():
        return star_path.parent / p
    for base in (*Path(os.path.abspath(star_path.parent)).parents, Path.cwd()):
        if (base / p).exists():
            return base / p
    raise _Unavailable(f"the ground-truth stack {name} named in {star_path.name} is missing.")


def _named_images(names: Sequence[str], star_path: Path) -> np.ndarray:
    """Images given as RELION ``index@stack`` names, in order."""
    parsed = [parse_image_name(str(n), star_path) for n in names]
    out: list[np.ndarray | None] = [None] * len(parsed)
    by_stack: dict[str, list[int]] = {}
    for i, (_, stack) in enumerate(parsed):
        by_stack.setdefault(stack, []).append(i)
    for stack, rows in by_stack.items():
        src = open_source(_resolve_stack(stack, star_path))
        imgs = src.images(np.array([parsed[r][0] for r in rows]))
        for r, img in zip(rows, imgs, strict=True):
            out[r] = img
    return np.stack(out)  # type: ignore[arg-type]


def _spread(candidates: np.ndarray, n: int) -> np.ndarray:
    """Up to n entries of `candidates`, evenly spaced through it."""
    if len(candidates) <= n:
        return candidates
    return candidates[np.unique(np.linspace(0, len(candidates) - 1, n).round().astype(int))]


def _tile_grid(run: _Run, rows: Sequence[tuple[str, Sequence[tuple[np.ndarray, str]]]],
               name: str, cls: str = "tiles") -> str:
    """A table of image tiles: one labelled row per entry, a caption under each tile."""
    body = []
    for r, (label, tiles) in enumerate(rows):
        cells = "".join(
            f'<td><figure class="tile">'
            f"{run.img(tile_png(img, 96), f'{name}-{r}-{c}', f'{label}: {cap}')}"
            f"<figcaption>{_e(cap)}</figcaption></figure></td>"
            for c, (img, cap) in enumerate(tiles)
        )
        body.append(f'<tr><th scope="row">{_e(label)}</th>{cells}</tr>')
    return f'<div class="scroll"><table class="{cls}"><tbody>{"".join(body)}</tbody></table></div>'


# --------------------------------------------------------------------------------------------
# sections


def _section_denoise(run: _Run) -> str:
    parts: list[str] = []
    denoise_ok = run.usable("denoise")
    if not denoise_ok:
        parts.append(_notice(run.why_not("denoise", "Denoising")))
    else:
        params = run.stages["denoise"].get("params")
        params = params if isinstance(params, dict) else {}
        model = params.get("model") or params.get("method")
        if model:
            parts.append(f"<p>Denoiser: <code>{_e(model)}</code>.</p>")
    parts.append(_denoise_panel(run, denoise_ok))
    parts.append(_denoise_metrics(run))
    return "".join(parts)


def _denoise_panel(run: _Run, denoise_ok: bool) -> str:
    try:
        in_path, in_label = run.input_path()
    except _Unavailable as note:
        return _notice(f"Before/after panel: {note}")
    src = open_source(in_path)
    meta = src.metadata
    den = None
    notes = []
    if denoise_ok:
        try:
            den = open_source(run.output("denoise", "star"))
        except _Unavailable as note:
            notes.append(f"Denoised images: {note}")
        if den is not None and len(den) != len(src):
            notes.append(f"Denoised images left out: the denoised stack holds {len(den)} images, "
                         f"the input {len(src)}.")
            den = None
    truth = (meta is not None and "cryosiftIsParticle" in meta.columns)
    if truth:
        candidates = np.flatnonzero(meta["cryosiftIsParticle"].to_numpy().astype(int) == 1)
        if not len(candidates):
            candidates = np.arange(len(src))
    else:
        candidates = np.arange(len(src))
    idx = _spread(candidates, N_PANEL)
    caps = [f"#{i + 1}" for i in idx]
    if truth:
        junk = meta["cryosiftJunkType"].astype(str).to_numpy() if (
            "cryosiftJunkType" in meta.columns) else None
        caps = [c if junk is None or junk[i] in ("none", "") else f"{c} {junk[i]}"
                for c, i in zip(caps, idx, strict=True)]
    rows = [(in_label, list(zip(src.images(idx), caps, strict=True)))]
    if den is not None:
        rows.append(("denoised", list(zip(den.images(idx), caps, strict=True))))
    if meta is not None and "cryosiftCleanImageName" in meta.columns:
        try:
            clean = _named_images(list(meta["cryosiftCleanImageName"].iloc[idx]), in_path)
            rows.append(("clean (ground truth)", list(zip(clean, caps, strict=True))))
        except _Unavailable as note:
            notes.append(f"Ground-truth images: {note}")
    what = "true particles" if truth else "images"
    head = (f"<p>{len(idx)} {what} spread through the stack of {len(src)} (image number under "
            "each; every tile is contrast-stretched on its own).</p>")
    return head + _tile_grid(run, rows, "denoise") + "".join(_notice(n) for n in notes)


_IMAGE_METRICS = (
    ("psnr", "PSNR (dB)"),
    ("si_psnr", "scale-invariant PSNR (dB)"),
    ("cc", "correlation coefficient"),
    ("ssim", "SSIM"),
    ("mse", "MSE"),
    ("frc_resolution_A", "FRC-0.5 resolution (Å, lower is better)"),
)


def _denoise_metrics(run: _Run) -> str:
    m = run.section_metrics("denoise") or {}
    halves = run.section_metrics("halves")
    raw, den = m.get("raw"), m.get("denoised")
    raw = raw if isinstance(raw, dict) else None
    den = den if isinstance(den, dict) else None
    parts = ['<h3 id="frc">Fourier ring correlation</h3>']
    curves: dict[str, dict] = {}
    frc = m.get("frc") if isinstance(m.get("frc"), dict) else {}
    for key, label, scores in (("raw", "input vs clean", raw), ("denoised", "denoised vs clean",
                                                                   den)):
        c = frc.get(key)
        if _is_curve(c):
            res = _num(scores, "frc_resolution_A")
            curves[label + (f" ({res:.1f} Å)" if res is not None else "")] = c
    if halves and _is_curve(halves.get("frc")):
        res = _num(halves, "frc_resolution_A")
        curves["half A vs half B" + (f" ({res:.1f} Å)" if res is not None else "")] = halves["frc"]
    if curves:
        parts.append(run.img(frc_png(curves), "frc", "FRC curves: " + "; ".join(curves),
                             cls="plot"))
        parts.append('<p class="caption">Curves: ' + _e("; ".join(curves)) + ". Dashed lines: "
                     "0.5 (against the clean images) and 0.143 (between two independent "
                     "halves); resolutions where each curve first falls below its line.</p>")
    else:
        parts.append(_notice("No FRC curves: " + (run.metrics_note or
                                                  "metrics.json has no FRC curves") + "."))
    parts.append("<h3>Image quality against the clean images</h3>")
    if raw or den:
        rows = []
        keys = [k for k, _ in _IMAGE_METRICS]
        skip = {*keys, "n_images", "pixel_size", "frc_threshold"}
        extra = sorted(k for d in (raw or {}, den or {}) for k, v in d.items()
                       if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool))
        for key, label in [*_IMAGE_METRICS, *((k, k) for k in dict.fromkeys(extra))]:
            a, b = _num(raw, key), _num(den, key)
            if a is None and b is None:
                continue
            change = "—"
            if a is not None and b is not None and math.isfinite(a) and math.isfinite(b):
                change = f"{b - a:+.3g}"
            rows.append([_e(label), _e(_fmt(a)), _e(_fmt(b)), _e(change)])
        parts.append(_table(["metric", "input", "denoised", "change"], rows))
        n = _num(raw, "n_images") or _num(den, "n_images")
        if n is not None:
            parts.append(f'<p class="caption">Measured on {int(n)} images (true particles where '
                         "the truth says which).</p>")
    else:
        parts.append(_notice("No image-quality metrics: " + (
            run.metrics_note or "metrics.json has no 'denoise' section") + "."))
    if halves:
        h = dict(halves)
        if _num(h, "frc_resolution_A") is not None:
            h["halves_resolution"] = h["frc_resolution_A"]
        table = _metrics_table(h, ["snr", "halves_resolution", "n_images"])
        if table:
            parts.append("<h3>Between two independent noisy halves</h3>" + table)
    return "".join(parts)


def _is_curve(c: Any) -> bool:
    return (isinstance(c, dict) and isinstance(c.get("frequency_per_A"), list)
            and isinstance(c.get("curve"), list) and len(c["curve"]) > 1
            and len(c["curve"]) == len(c["frequency_per_A"]))


def _screen_summary(run: _Run) -> dict:
    """Threshold, counts, scores and truth of the screen stage (raises _Unavailable)."""
    if not run.usable("screen"):
        raise _Unavailable(run.why_not("screen", "Screening"))
    scores_path = run.output("screen", "scores")
    table = read_star(scores_path).particles
    if SCORE_COLUMN not in table.columns:
        raise _Unavailable(f"{scores_path.name} has no _{SCORE_COLUMN} column.")
    d = run.stage_dir("screen")
    record: dict = {}
    if d is not None and (d / "screen_apply.json").is_file():
        try:
            loaded = json.loads((d / "screen_apply.json").read_text(encoding="utf-8"))
            record = loaded if isinstance(loaded, dict) else {}
        except (OSError, UnicodeDecodeError, ValueError) as err:
            log.warning("report: screen_apply.json unreadable (%s)", err)
    scores = table[SCORE_COLUMN].to_numpy(float)
    params = run.stages["screen"].get("params")
    params = params if isinstance(params, dict) else {}
    thr = _num(record, "threshold")
    thr = thr if thr is not None else _num(run.section_metrics("screen"), "threshold")
    thr = thr if thr is not None else _num(params, "threshold")
    n_kept = record.get("n_kept")
    if not isinstance(n_kept, int):
        n_kept = int((scores >= thr).sum()) if thr is not None else None
    truth = (table["cryosiftIsParticle"].to_numpy().astype(int)
             if "cryosiftIsParticle" in table.columns else None)
    return {"scores": scores, "threshold": thr, "n": len(scores), "n_kept": n_kept,
            "truth": truth, "table": table, "selection": record.get("selection")}


def _screen_metrics(run: _Run, s: dict | None) -> dict | None:
    m = run.section_metrics("screen")
    if m and all(k in m for k in ("tp", "fp", "tn", "fn")):
        return m
    if s is not None and s["truth"] is not None and s["threshold"] is not None:
        from cryosift.metrics import screening_metrics

        out = screening_metrics(s["truth"], s["scores"], s["threshold"])
        out["source"] = "computed from scores.star"
        return out
    return m


def _section_screen(run: _Run) -> str:
    s = _screen_summary(run)
    parts = []
    kept = s["n_kept"]
    if kept is not None:
        pct = 100.0 * kept / s["n"] if s["n"] else 0.0
        thr = f" at threshold {s['threshold']:.3g}" if s["threshold"] is not None else ""
        parts.append(f"<p><b>{kept}</b> of {s['n']} images kept ({pct:.1f} %){_e(thr)}, "
                     f"<b>{s['n'] - kept}</b> rejected.</p>")
    parts.append(run.img(score_histogram_png(s["scores"], s["threshold"], s["truth"]),
                         "score-histogram", "histogram of screening scores", cls="plot"))
    parts.append("<h3>Top-scoring kept and lowest-scoring rejected images</h3>")
    parts.append(_screen_montage(run))
    m = _screen_metrics(run, s)
    parts.append("<h3>Against the ground truth</h3>")
    if m and all(isinstance(m.get(k), (int, float)) for k in ("tp", "fp", "tn", "fn")):
        tp, fp, tn, fn = (int(m[k]) for k in ("tp", "fp", "tn", "fn"))
        conf = _table(
            ["", "kept", "rejected", "total"],
            [["<b>true particle</b>", f"{tp}", f"{fn}", f"{tp + fn}"],
             ["<b>true junk</b>", f"{fp}", f"{tn}", f"{fp + tn}"],
             ["<b>total</b>", f"{tp + fp}", f"{fn + tn}", f"{tp + fp + fn + tn}"]],
            cls="data confusion2",
        )
        table = _metrics_table(m, ["accuracy", "precision", "recall", "f1", "roc_auc",
                                   "threshold"])
        note = f'<p class="caption">{_e(m["source"])}.</p>' if m.get("source") else ""
        parts.append(f'<div class="row"><div>{conf}</div><div>{table}</div></div>' + note)
    else:
        parts.append(_notice("No screening metrics: the images carry no ground truth "
                             "(_cryosiftIsParticle) and metrics.json has no 'screen' section."))
    return "".join(parts)


def _screen_montage(run: _Run) -> str:
    rows = []
    notes = []
    for key, label, best in (("kept", "kept (highest scores)", True),
                             ("rejected", "rejected (lowest scores)", False)):
        try:
            path = run.output("screen", key)
        except _Unavailable as note:
            notes.append(str(note))
            continue
        table = read_star(path).particles
        if not len(table):
            notes.append(f"No {key} images.")
            continue
        if SCORE_COLUMN not in table.columns:
            notes.append(f"{path.name} has no _{SCORE_COLUMN} column.")
            continue
        sc = table[SCORE_COLUMN].to_numpy(float)
        order = np.argsort(-sc if best else sc, kind="stable")[:N_PANEL]
        imgs = open_source(path).images(order)
        truth = (table["cryosiftIsParticle"].to_numpy().astype(int)
                 if "cryosiftIsParticle" in table.columns else None)
        caps = [f"{sc[i]:.3f}" + ("" if truth is None else (" ✓" if truth[i] else " junk"))
                for i in order]
        rows.append((label, list(zip(imgs, caps, strict=True))))
    out = ""
    if rows:
        out = _tile_grid(run, rows, "screen")
        out += ('<p class="caption">Score under each image'
                + ("; ✓ true particle, junk: true junk (ground truth)" if any(
                    "✓" in c or "junk" in c for _, t in rows for _, c in t) else "")
                + ".</p>")
    return out + "".join(_notice(n) for n in notes)


def _class_table(run: _Run) -> tuple[list[dict], int]:
    """[{class, size, fraction}] from class_stats.json (else classes.star), and N particles."""
    d = run.stage_dir("classify")
    if d is not None and (d / "class_stats.json").is_file():
        try:
            stats = json.loads((d / "class_stats.json").read_text(encoding="utf-8"))
            classes = [c for c in stats.get("classes", []) if isinstance(c, dict)]
            if classes and all(isinstance(c.get("class"), int) and isinstance(c.get("size"), int)
                               for c in classes):
                n = int(stats.get("n_images") or sum(c["size"] for c in classes))
                return classes, n
        except (OSError, UnicodeDecodeError, ValueError, AttributeError) as err:
            log.warning("report: class_stats.json unreadable (%s); counting classes.star", err)
    table = read_star(run.output("classify", "classes")).particles
    if "rlnClassNumber" not in table.columns:
        raise _Unavailable("classes.star has no _rlnClassNumber column.")
    counts = table["rlnClassNumber"].astype(int).value_counts()
    n = int(counts.sum())
    return [{"class": int(k), "size": int(v), "fraction": v / n} for k, v in counts.items()], n


def _class_metrics(run: _Run) -> dict | None:
    m = run.section_metrics("classify")
    if m:
        return m
    path = run.output("classify", "classes", required=False)
    if path is None:
        return None
    table = read_star(path).particles
    if not {"rlnClassNumber", "cryosiftTrueView"} <= set(table.columns):
        return None
    from cryosift.metrics import clustering_metrics, contingency

    view = table["cryosiftTrueView"].to_numpy().astype(int)
    cls = table["rlnClassNumber"].to_numpy().astype(int)
    ok = view >= 0
    out: dict = {"source": "computed from classes.star"}
    if ok.sum() > 1:
        out.update(clustering_metrics(view[ok], cls[ok]))
    c, views, classes = contingency(view, cls)
    out["confusion"] = {"views": views.tolist(), "classes": classes.tolist(), "matrix": c.tolist()}
    return out


def _section_classify(run: _Run) -> str:
    if not run.usable("classify"):
        raise _Unavailable(run.why_not("classify", "Classification"))
    classes, n = _class_table(run)
    classes = sorted(classes, key=lambda c: (-c["size"], c["class"]))
    parts = [f"<p><b>{len(classes)}</b> classes of {n} particles, largest first.</p>"]
    try:
        avg_path = run.output("classify", "averages")
        avgs = open_source(avg_path)
        tiles = []
        for c in classes:
            k = c["class"]
            pct = 100.0 * c["size"] / n if n else 0.0
            cap = f"class {k} · {c['size']} ({pct:.1f} %)"
            if not 1 <= k <= len(avgs):
                tiles.append(f'<figure class="avg missing"><div>no average</div>'
                             f"<figcaption>{_e(cap)}</figcaption></figure>")
                continue
            img = run.img(tile_png(avgs.images([k - 1])[0]), f"class-{k}", f"average of class {k}")
            tiles.append(f'<figure class="avg">{img}<figcaption>{_e(cap)}</figcaption></figure>')
        parts.append(f'<div class="gallery">{"".join(tiles)}</div>')
    except _Unavailable as note:
        parts.append(_notice(f"Class averages: {note}"))
    parts.append("<h3>Against the ground truth</h3>")
    m = _class_metrics(run)
    if not m:
        parts.append(_notice("No clustering metrics: the particles carry no true views "
                             "(_cryosiftTrueView) and metrics.json has no 'classify' section."))
        return "".join(parts)
    parts.append(_metrics_table(m, ["acc", "nmi", "ari"], extra=True))
    if m.get("source"):
        parts.append(f'<p class="caption">{_e(m["source"])}.</p>')
    conf = m.get("confusion")
    if isinstance(conf, dict):
        parts.append(_confusion_table(conf))
    return "".join(parts)


def _confusion_table(conf: dict) -> str:
    views, classes = conf.get("views") or [], conf.get("classes") or []
    mat = np.asarray(conf.get("matrix") or [], dtype=float)
    if mat.shape != (len(views), len(classes)) or not mat.size:
        return _notice("The view × class confusion matrix in metrics.json is malformed.")
    row_tot = mat.sum(axis=1)
    head = "".join(f"<th>{_e(c)}</th>" for c in classes)
    rows = []
    for v, counts, tot in zip(views, mat, row_tot, strict=True):
        label = "junk" if isinstance(v, (int, float)) and v < 0 else f"view {v}"
        cells = []
        for x in counts:
            f = x / tot if tot > 0 else 0.0
            style = f"background:rgba(43,123,186,{f:.2f})" + (";color:#fff" if f > 0.55 else "")
            cells.append(f'<td style="{style}">{int(x)}</td>')
        rows.append(f'<tr><th scope="row">{_e(label)}</th>{"".join(cells)}'
                    f"<td class=\"total\">{int(tot)}</td></tr>")
    col_tot = "".join(f"<td>{int(t)}</td>" for t in mat.sum(axis=0))
    return (
        "<p>True view (rows) × class (columns): counts; shading is the fraction of the view's "
        'particles in each class.</p><div class="scroll"><table class="confusion">'
        f'<thead><tr><th>view \\ class</th>{head}<th>total</th></tr></thead>'
        f'<tbody>{"".join(rows)}<tr class="total"><th scope="row">total</th>{col_tot}'
        f"<td>{int(mat.sum())}</td></tr></tbody></table></div>"
    )


def _section_provenance(run: _Run) -> str:
    info = run.info
    inp = info.get("input") if isinstance(info.get("input"), dict) else {}
    top = [
        ("cryosift version of the run", info.get("cryosift_version", "—")),
        ("command line", info.get("command", "—")),
        ("created", info.get("created", "—")),
        ("input", inp.get("path", "—")),
        ("total time", _seconds(info.get("total_seconds"))),
        ("report written by", f"cryosift {__version__}, "
                              f"{_dt.datetime.now().astimezone().isoformat(timespec='seconds')}"),
    ]
    parts = [_kv_table(top)]
    rows = []
    names = [*STAGES, *(n for n in run.stages if n not in STAGES)]
    for name in names:
        st = run.stages.get(name)
        if st is None:
            rows.append([f"<b>{_e(name)}</b>", '<span class="status absent">not run</span>',
                         "—", "—", "—"])
            continue
        status = str(st.get("status", "unknown"))
        params = st.get("params") if isinstance(st.get("params"), dict) else {}
        outs = st.get("outputs") if isinstance(st.get("outputs"), dict) else {}
        pcell = (f"<details><summary>{len(params)} parameter{'s' * (len(params) != 1)}"
                 "</summary>"
                 f"{_kv_table(params.items())}</details>" if params else "—")
        ocell = "<br>".join(f"<code>{_e(v)}</code>" for v in outs.values()) or "—"
        reason = st.get("reason")
        why = f'<br><span class="caption">{_e(reason)}</span>' if reason else ""
        rows.append([f"<b>{_e(name)}</b>",
                     f'<span class="status {_e(status)}">{_e(status)}</span>{why}',
                     _e(_seconds(st.get("seconds"))), pcell, ocell])
    parts.append("<h3>Stages</h3>" + _table(["stage", "status", "time", "parameters", "outputs"],
                                            rows, cls="data stages"))
    config = info.get("config") if isinstance(info.get("config"), dict) else {}
    parts.append(f"<h3>Configuration</h3><details><summary>all {len(config)} parameters"
                 f"</summary>{_kv_table(sorted(config.items()))}</details>" if config
                 else "<h3>Configuration</h3>" + _notice("run.json records no configuration."))
    return "".join(parts)


# --------------------------------------------------------------------------------------------
# headline


def _headline(run: _Run, screen: dict | None, n_classes: int | None) -> str:
    info = run.info
    inp = info.get("input") if isinstance(info.get("input"), dict) else {}
    items = []
    desc = []
    if inp.get("n_images") is not None:
        desc.append(f"{_fmt(inp.get('n_images'))} images")
    if inp.get("box") is not None:
        desc.append(f"box {_fmt(inp.get('box'))} px")
    if inp.get("pixel_size") is not None:
        desc.append(f"pixel size {_fmt(inp.get('pixel_size'))} Å")
    items.append(f"<li><b>Input</b>: <code>{_e(inp.get('path', '—'))}</code>"
                 + (f" — {_e(', '.join(desc))}" if desc else "") + "</li>")
    if screen is not None and screen["n_kept"] is not None:
        pct = 100.0 * screen["n_kept"] / screen["n"] if screen["n"] else 0.0
        items.append(f"<li><b>Screening</b>: kept {screen['n_kept']} of {screen['n']} "
                     f"({pct:.1f} %)</li>")
    if n_classes is not None:
        items.append(f"<li><b>Classification</b>: {n_classes} classes</li>")
    if info.get("total_seconds") is not None:
        items.append(f"<li><b>Total time</b>: {_e(_seconds(info.get('total_seconds')))}</li>")
    badges = "".join(
        f'<span class="status {_e(run.status(n))}" title="{_e(run.status(n))}">{_e(n)}: '
        f'{_e(run.status(n) if run.status(n) != "absent" else "not run")}</span> '
        for n in STAGES
    )
    items.append(f"<li><b>Stages</b>: {badges}</li>")
    return f'<ul class="headline">{"".join(items)}</ul>' + _scores_box(run, screen)


def _scores_box(run: _Run, screen: dict | None) -> str:
    cells = []
    d = run.section_metrics("denoise") or {}
    raw = d.get("raw") if isinstance(d.get("raw"), dict) else None
    den = d.get("denoised") if isinstance(d.get("denoised"), dict) else None
    # scale-invariant: normalisation rescales the input, so plain PSNR would compare scales
    a, b = _num(raw, "si_psnr"), _num(den, "si_psnr")
    if a is not None and b is not None:
        cells.append(("PSNR (scale-invariant) input → denoised", f"{a:.2f} → {b:.2f} dB"))
    a, b = _num(raw, "frc_resolution_A"), _num(den, "frc_resolution_A")
    if a is not None and b is not None:
        cells.append(("FRC-0.5 resolution", f"{_fmt(a, 3)} → {_fmt(b, 3)} Å"))
    try:
        sm = _screen_metrics(run, screen)
    except Exception:  # noqa: BLE001 - the screening section reports its own problem
        sm = None
    for key, label in (("f1", "screening F1"), ("roc_auc", "screening ROC-AUC")):
        if _num(sm, key) is not None:
            cells.append((label, _fmt(sm[key], 3)))
    try:
        cm = _class_metrics(run) if run.usable("classify") else run.section_metrics("classify")
    except Exception:  # noqa: BLE001 - the classification section reports its own problem
        cm = None
    for key, label in (("acc", "classification ACC"), ("nmi", "classification NMI")):
        if _num(cm, key) is not None:
            cells.append((label, _fmt(cm[key], 3)))
    if not cells:
        return ""
    body = "".join(f'<div class="score"><div class="value">{_e(v)}</div>'
                   f'<div class="label">{_e(k)}</div></div>' for k, v in cells)
    return f'<div class="scores" id="headline-scores">{body}</div>'


# --------------------------------------------------------------------------------------------
# the page


def _guarded(run: _Run, title: str, build: Callable[[_Run], str]) -> str:
    """A section's HTML; absent inputs become a grey notice, any other failure a red box."""
    try:
        return build(run)
    except _Unavailable as note:
        return _notice(str(note))
    except Exception as err:  # noqa: BLE001 - one broken section must not lose the report
        log.warning("report: %s section could not be drawn: %s", title, err)
        return (f'<div class="problem"><b>This section could not be drawn:</b> '
                f"{_e(type(err).__name__)}: {_e(err)}</div>")


def build_report(run_dir: str | Path, out_path: str | Path | None = None) -> Path:
    """Write the HTML report of the run folder ``run_dir`` (default ``RUN_DIR/report.html``).

    Raises InputError when ``run_dir`` is not a run folder (missing, no or unreadable
    run.json) and OutputError when the page cannot be written; nothing is written then.
    """
    run_dir = Path(run_dir)
    run = _Run(run_dir)
    out = Path(out_path) if out_path is not None else run_dir / "report.html"
    if out.is_dir():
        raise OutputError("is a folder; give a file name for the report", out)
    page = _render(run)
    atomic_write_text(out, page)
    log.debug("report: %s (%d figures, %.1f MB)", out, run.n_figures, len(page) / 1e6)
    return out


def render_report(run_dir: str | Path) -> str:
    """The report page of the run folder ``run_dir`` as a string (nothing is written)."""
    return _render(_Run(Path(run_dir)))


def _render(run: _Run) -> str:
    screen = None
    try:
        screen = _screen_summary(run)
    except Exception:  # noqa: BLE001 - the screening section reports its own problem
        screen = None
    n_classes = None
    if run.usable("classify"):
        try:
            n_classes = len(_class_table(run)[0])
        except Exception:  # noqa: BLE001 - the classification section reports its own problem
            n_classes = None
    sections = [
        ("denoise", "Denoising", _section_denoise),
        ("screen", "Screening", _section_screen),
        ("classify", "Classification", _section_classify),
        ("provenance", "Parameters and provenance", _section_provenance),
    ]
    headline = _guarded(run, "headline", lambda r: _headline(r, screen, n_classes))
    body = "".join(
        f'<section id="{sid}"><h2>{_e(title)}</h2>{_guarded(run, title, build)}</section>'
        for sid, title, build in sections
    )
    nav = " · ".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title, _ in sections)
    title = f"cryosift run report — {run.dir.resolve().name}"
    metrics_line = (_notice(f"Ground truth: {run.metrics_note}.") if run.metrics_note
                    and not run.metrics else "")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="cryosift {_e(__version__)}">
<title>{_e(title)}</title>
<style>
{_CSS}
</style>
</head>
<body data-figures-expected="{run.n_figures}">
<header>
<h1>{_e(title)}</h1>
<p class="sub">Run folder <code>{_e(run.dir)}</code></p>
<nav>{nav}</nav>
</header>
<main>
<section id="summary"><h2>Summary</h2>{headline}{metrics_line}</section>
{body}
</main>
<footer>
<p id="figure-check">Figure check: {run.n_figures} embedded figures (the check runs in the
browser once the page has loaded).</p>
<p>Written by cryosift {_e(__version__)}. Self-contained: every figure is embedded in this
file.</p>
</footer>
<script>
{_SCRIPT}
</script>
</body>
</html>
"""


_CSS = """
:root { --fg: #1d2430; --muted: #5b6577; --line: #d6dbe3; --accent: #2b7bba;
        --bg-soft: #f4f6f9; }
* { box-sizing: border-box; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
       sans-serif; color: var(--fg); margin: 0 auto; max-width: 1180px; padding: 0 20px 40px;
       line-height: 1.45; font-size: 15px; }
header { border-bottom: 2px solid var(--accent); margin-bottom: 8px; }
h1 { font-size: 1.6em; margin: 18px 0 2px; }
h2 { font-size: 1.3em; margin: 28px 0 8px; border-bottom: 1px solid var(--line);
     padding-bottom: 3px; }
h3 { font-size: 1.05em; margin: 18px 0 6px; }
.sub { color: var(--muted); margin: 0 0 6px; }
nav { margin: 6px 0 10px; }
nav a { color: var(--accent); text-decoration: none; }
code { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace;
       font-size: 0.88em; background: var(--bg-soft); padding: 0 3px; border-radius: 3px;
       word-break: break-all; }
table { border-collapse: collapse; margin: 6px 0 10px; font-size: 0.92em; }
th, td { border: 1px solid var(--line); padding: 3px 8px; text-align: left;
         vertical-align: top; }
thead th { background: var(--bg-soft); }
table.data td { font-variant-numeric: tabular-nums; }
table.kv th { background: var(--bg-soft); font-weight: 600; white-space: nowrap; }
table.tiles th { white-space: nowrap; vertical-align: middle; background: var(--bg-soft); }
table.tiles td { border: none; padding: 2px; }
table.confusion td { text-align: right; min-width: 2.6em; font-variant-numeric: tabular-nums; }
table.confusion .total, table.confusion tr.total td { background: var(--bg-soft); }
table.confusion2 td { text-align: right; }
.scroll { overflow-x: auto; }
figure { margin: 0; }
figure.tile img { width: 96px; height: 96px; display: block; image-rendering: auto; }
figure.tile figcaption { font-size: 0.75em; color: var(--muted); text-align: center; }
.gallery { display: flex; flex-wrap: wrap; gap: 10px; margin: 8px 0; }
figure.avg { width: 124px; text-align: center; }
figure.avg img { width: 120px; height: 120px; display: block; margin: 0 auto;
                 border: 1px solid var(--line); image-rendering: auto; }
figure.avg.missing div { width: 120px; height: 120px; line-height: 120px; margin: 0 auto;
                         background: var(--bg-soft); color: var(--muted); }
figure.avg figcaption { font-size: 0.78em; margin-top: 2px; }
img.plot { max-width: 100%; height: auto; display: block; margin: 6px 0; }
.caption { color: var(--muted); font-size: 0.88em; margin-top: 0; }
.absent { color: var(--muted); background: var(--bg-soft); border-left: 4px solid #aab3c0;
          padding: 6px 10px; margin: 8px 0; }
.problem { color: #8a1c1c; background: #fdecec; border-left: 4px solid #c0392b;
           padding: 6px 10px; margin: 8px 0; }
ul.headline { padding-left: 20px; }
.status { display: inline-block; padding: 0 7px; border-radius: 9px; font-size: 0.85em;
          background: #e3e7ee; color: var(--muted); margin: 1px 0; }
.status.done { background: #dff2e1; color: #1f6b2a; }
.status.reused { background: #e2eefa; color: #1f4f7a; }
.status.disabled, .status.absent { background: #eceff3; color: #7a8494; }
.scores { display: flex; flex-wrap: wrap; gap: 10px; margin: 10px 0; }
.score { border: 1px solid var(--line); border-radius: 6px; padding: 8px 14px;
         background: var(--bg-soft); min-width: 150px; }
.score .value { font-size: 1.25em; font-weight: 600; }
.score .label { color: var(--muted); font-size: 0.85em; }
.row { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
details summary { cursor: pointer; color: var(--accent); }
footer { margin-top: 30px; border-top: 1px solid var(--line); color: var(--muted);
         font-size: 0.88em; }
#figure-check.ok { color: #1f6b2a; }
#figure-check.bad { color: #8a1c1c; font-weight: 600; }
""".strip()

_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = document.images, broken = [];
  for (var i = 0; i < imgs.length; i++) {
    var im = imgs[i];
    if (!(im.complete && im.naturalWidth > 0)) {
      broken.push(im.getAttribute("data-name") || ("img" + i));
    }
  }
  var n = imgs.length, ok = n - broken.length, b = document.body;
  b.setAttribute("data-figures-total", String(n));
  b.setAttribute("data-figures-loaded", String(ok));
  b.setAttribute("data-figures-broken", broken.join(" "));
  var line = document.getElementById("figure-check");
  if (line) {
    line.textContent = broken.length === 0
      ? "Figure check: all " + n + " figures loaded."
      : "Figure check: " + ok + " of " + n + " figures loaded; broken: " + broken.join(", ");
    line.className = broken.length === 0 ? "ok" : "bad";
  }
});
""".strip()
