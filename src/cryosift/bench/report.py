"""Benchmark results as files: results.json, results.md (tables), figures."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cryosift.io.atomic import atomic_path, atomic_write_json, atomic_write_text  # noqa: E402

COLUMNS = {
    "denoiser": ["psnr", "si_psnr", "cc", "ssim", "frc_resolution_A", "images_per_second"],
    "clusterer": [
        "acc",
        "nmi",
        "ari",
        "pair_f1",
        "min_max_class_ratio",
        "class_average_frc_resolution_A",
    ],
    "screener": ["accuracy", "precision", "recall", "f1", "roc_auc"],
    "classes2d": [
        "class_average_frc_resolution_A",
        "best_class_frc_resolution_A",
        "angular_spread_deg",
        "min_max_class_ratio",
        "images_per_second",
    ],
}


def _fmt(v: object) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return str(v)


def _rank(value: object, column: str) -> float:
    """Sort key putting the best row first: resolutions in Å (``*_A``) ascending, scores
    descending; missing or NaN values last."""
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.inf
    if math.isnan(v):
        return math.inf
    return v if column.endswith("_A") else -v


def markdown(results: dict, protocol: dict, command: str) -> str:
    """One table per benchmark setting and kind; oracle rows marked; the command on top."""
    lines = [
        "# cryosift benchmark results",
        "",
        f"Command: `{command}`",
        "",
        "Rows marked (oracle) read the clean images: `wiener_oracle`, `nearest_view_oracle`,",
        "`matched_filter_oracle` and every `<filter>_best` (its parameters tuned for PSNR",
        "against the clean images on the first particle images). PSNR uses each clean image's",
        "own data range; SI-PSNR rescales the output to the clean image first; FRC resolution",
        "is where the FRC against the clean stack falls below 0.5 (Å, lower is better).",
        "",
    ]
    for bid, settings in results.items():
        meta = protocol.get(bid, {})
        lines += [
            f"## {bid}: {meta.get('title', '')}",
            f"Reproduces: {meta.get('reproduces', '')}",
            "",
        ]
        for key, methods in settings.items():
            lines += [f"### {bid} {key}", ""]
            lines += _references(meta.get("references", {}).get(key), meta.get("settings", {}))
            for kind, cols in COLUMNS.items():
                rows = {m: s for m, s in methods.items() if s.get("kind") == kind}
                if not rows:
                    continue
                lines.append("| method | " + " | ".join(cols) + " |")
                lines.append("|---" * (len(cols) + 1) + "|")
                order = sorted(rows, key=lambda m: _rank(rows[m].get(cols[0]), cols[0]))
                for m in order:
                    tag = " (oracle)" if rows[m].get("oracle") else ""
                    lines.append(
                        f"| {m}{tag} | " + " | ".join(_fmt(rows[m].get(c)) for c in cols) + " |"
                    )
                lines.append("")
    return "\n".join(lines) + "\n"


def _references(tools: dict | None, settings: dict) -> list[str]:
    """Other tools' figures in this setting (run elsewhere, as the benchmark records them)."""
    if not tools:
        return []
    metrics = sorted({m for v in tools.values() for m in v})
    sizes = sorted({s.get("n_images") for s in settings.values()})
    lines = [
        "Reference figures of other tools in this setting, run elsewhere on their own "
        f"simulation of it (not by this benchmark, which used {'/'.join(map(str, sizes))} "
        "images):",
        "",
        "| tool | " + " | ".join(metrics) + " |",
        "|---" * (len(metrics) + 1) + "|",
    ]
    for tool, vals in tools.items():
        lines.append(f"| {tool} | " + " | ".join(_fmt(vals.get(m)) for m in metrics) + " |")
    return lines + [""]


def psnr_vs_setting_plot(settings: dict, path: Path, metric: str = "psnr") -> Path | None:
    """Metric of each denoiser across the settings of one benchmark (e.g. B1's SNR sweep)."""
    keys = list(settings)
    methods = sorted(
        {m for s in settings.values() for m, v in s.items() if v.get("kind") == "denoiser"}
    )
    if not methods or len(keys) < 2:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = plt.cm.tab20(range(20))
    for i, m in enumerate(methods):
        ys = [settings[k].get(m, {}).get(metric, float("nan")) for k in keys]
        style = "--" if m.endswith("oracle") else "-"
        ax.plot(range(len(keys)), ys, style, marker="o", ms=3, label=m, color=colours[i % 20])
    ax.set_xticks(range(len(keys)), keys, rotation=30, fontsize=8)
    ax.set_ylabel(metric)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def write_results(
    results: dict, protocol: dict, out_dir: Path, command: str, provenance: dict
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "results.json", results)
    atomic_write_json(out_dir / "protocol.json", {"protocol": protocol, "provenance": provenance})
    atomic_write_text(out_dir / "results.md", markdown(results, protocol, command))
    for bid, settings in results.items():
        for metric in ("psnr", "cc"):
            psnr_vs_setting_plot(settings, out_dir / f"{bid}_{metric}.png", metric)
