"""The method registry and the benchmark harness, end to end on a tiny protocol."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cryosift.bench import protocol as protocol_mod
from cryosift.bench.protocol import BENCHMARKS, DatasetSpec
from cryosift.errors import CryosiftError
from cryosift.registry import Method, available, get, register
from sim_helpers import data_file, run_cli


def test_registry_lists_filters_and_oracles():
    names = {m.name for m in available("denoiser")}
    assert {"raw", "lowpass", "bilateral", "bilateral+histeq", "histeq", "wiener_oracle"} <= names
    assert get("denoiser", "wiener_oracle").oracle
    assert not get("denoiser", "lowpass").oracle
    with pytest.raises(CryosiftError, match="unknown denoiser"):
        get("denoiser", "nope")
    with pytest.raises(ValueError, match="twice"):
        register(Method("denoiser", "raw", lambda: None, "duplicate"))


def test_protocol_matches_the_spec():
    assert set(BENCHMARKS) == {"B1", "B2", "B3", "B4", "B5", "P10"}
    b1 = BENCHMARKS["B1"].settings
    assert sorted(s.snr for s in b1.values()) == [0.01, 0.02, 0.05, 0.1, 0.2, 0.5]
    assert {s.structure for s in b1.values()} == {"1aon.pdb.gz"}
    b3 = BENCHMARKS["B3"].settings.values()
    assert sorted(s.snr for s in b3) == [0.0078, 0.0156, 0.0312, 0.0625]
    assert all(s.n_images == 10000 and s.junk_fraction == 0.5 for s in b3)  # 5000 + 5000
    b4 = BENCHMARKS["B4"].settings
    assert sorted({s.views for s in b4.values()}) == [10, 50]
    b5 = BENCHMARKS["B5"].settings["realistic"]
    assert b5.ctf and b5.max_shift > 0 and set(b5.junk_types) >= {"ice", "carbon", "aggregate"}
    # fragments of another protein, as the issue asks, not pieces of GroEL itself
    assert "fragment" in b5.junk_types and b5.junk_structure not in (None, b5.structure)


def test_phantom10_is_the_issue_setting_and_prints_the_other_tools_beside():
    from cryosift.bench.report import markdown
    from cryosift.bench.runner import protocol_record

    p10 = BENCHMARKS["P10"].settings
    assert sorted(s.snr for s in p10.values()) == [0.01, 0.1]
    assert all(s.views == 10 and s.n_images == 2000 and s.box == 64 and not s.ctf
               and not s.in_plane and "denoise" in s.tasks for s in p10.values())
    record = protocol_record(["P10"], quick=False)
    results = {"P10": {k: {"cwf": {"kind": "denoiser", "psnr": 20.0}} for k in p10}}
    md = markdown(results, record, "cmd")
    low, high = md.index("### P10 snr=0.01"), md.index("### P10 snr=0.1")
    section_01 = md[high:low] if high < low else md[high:]
    assert "| ASPIRE Cov2D | 29.5 |" in section_01
    assert "| Topaz-Denoise general | 23.7 |" in section_01
    assert "| ASPIRE Cov2D | 24.6 |" in md[low:] and "2000 images" in md
    assert "| cwf | 20 |" in section_01  # our rows follow in their own table


def test_dataset_fragments_come_from_the_junk_structure(tmp_path, monkeypatch):
    import cryosift.bench.runner as runner

    data_file("structures", "5F9R.pdb")
    monkeypatch.setattr(runner, "structure_path", lambda name: data_file("structures", name))
    spec = DatasetSpec("1aon.pdb.gz", 40, 48, 5.0, 0.1, junk_fraction=0.5,
                       junk_types=("fragment",), seed=3, tasks=("screen",),
                       junk_structure="5F9R.pdb")
    seen = {}
    real = runner.simulate

    def spy(structure, folder, cfg, junk_structure=None, **kw):
        seen["junk"] = junk_structure
        return real(structure, folder, cfg, junk_structure=junk_structure, **kw)

    monkeypatch.setattr(runner, "simulate", spy)
    a = runner.load_dataset(spec, tmp_path / "a")
    assert Path(seen["junk"]).name == "5F9R.pdb"
    b = runner.load_dataset(replace(spec, junk_structure=None), tmp_path / "b")
    junk = a.metadata["cryosiftIsParticle"].to_numpy() == 0
    assert junk.any()
    # same seed, same draws: only the fragments' source differs
    assert not np.allclose(a.clean[junk], b.clean[junk], atol=1e-3)
    assert np.allclose(a.clean[~junk], b.clean[~junk], atol=1e-4)


TINY = DatasetSpec("5F9R.pdb", 120, 40, 5.0, 0.1, views=3, in_plane=False, seed=4,
                   tasks=("denoise", "views"))


@pytest.fixture()
def tiny_protocol(monkeypatch):
    data_file("structures", "5F9R.pdb")
    settings = {"snr=0.1": TINY, "snr=0.5": replace(TINY, snr=0.5, seed=5),
                "screen": replace(TINY, views=None, junk_fraction=0.5, tasks=("screen",), seed=6)}
    monkeypatch.setattr(protocol_mod, "benchmark_settings", lambda bid, quick: settings)
    import cryosift.bench.runner as runner

    monkeypatch.setattr(runner, "benchmark_settings", lambda bid, quick: settings)
    monkeypatch.setattr(runner, "structure_path", lambda name: data_file("structures", name))
    return settings


def test_bench_cli_writes_results_with_oracles_on_top(tiny_protocol, tmp_path, capsys):
    # every denoiser but the long-training ones (they have their own tests); n2n stays, to run
    # the harness's pairs path
    methods = ",".join(m.name for m in available("denoiser")
                       if not m.name.startswith(("cdae", "dae", "drvae", "n2v", "n2n-scratch")))
    args = ["-q", "bench", "B1", "--quick", "-o", str(tmp_path / "b"), "--methods", methods]
    code = run_cli(args)
    assert code == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    assert set(results) == {"B1"} and set(results["B1"]) == {"snr=0.1", "snr=0.5", "screen"}
    for key in ("snr=0.1", "snr=0.5"):
        r = results["B1"][key]
        assert {"raw", "lowpass", "lowpass_best", "bilateral+histeq", "wiener_oracle",
                "nearest_view_oracle"} <= set(r)
        assert "phaseflip" not in r  # no CTF in these datasets
        linear = [m for m in r if m.startswith(("lowpass", "butterworth", "gaussian"))]
        # the Wiener oracle is the MMSE linear filter: no low-pass or blur may beat it in PSNR
        assert all(r["wiener_oracle"]["psnr"] >= r[m]["psnr"] for m in linear)
        assert r["lowpass_best"]["psnr"] >= r["lowpass"]["psnr"] - 0.05  # tuned on a subset
        assert r["raw"]["psnr"] < r["wiener_oracle"]["psnr"]
        assert 0.5 < r["nearest_view_oracle"]["acc"] <= 1.0
        assert r["lowpass_best"]["oracle"] and not r["lowpass"]["oracle"]
    assert results["B1"]["snr=0.5"]["raw"]["psnr"] > results["B1"]["snr=0.1"]["raw"]["psnr"]
    screen = results["B1"]["screen"]["matched_filter_oracle"]
    assert screen["kind"] == "screener" and screen["roc_auc"] > 0.9
    md = (tmp_path / "b" / "results.md").read_text()
    assert "wiener_oracle (oracle)" in md and "| method |" in md and "cryosift" in md
    assert (tmp_path / "b" / "B1_psnr.png").stat().st_size > 1000
    # cached datasets are reused: a second run does not simulate again
    star = next((tmp_path / "b" / "data").rglob("particles.star"))
    mtime = star.stat().st_mtime
    assert run_cli(args) == 0
    assert star.stat().st_mtime == mtime


def test_bench_unknown_benchmark_is_refused(tmp_path, capsys):
    code = run_cli(["bench", "B9", "-o", str(tmp_path / "x")])
    assert code != 0 and "B9" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_geometric_weights_are_unequal():
    w = np.asarray(BENCHMARKS["B4"].settings["K=10,snr=0.05"].view_weights)
    assert w.max() / w.min() == pytest.approx(4.0)


def test_results_tables_put_the_best_row_first():
    from cryosift.bench.report import markdown

    results = {"B5": {"realistic": {
        "a": {"kind": "classes2d", "class_average_frc_resolution_A": 40.0},
        "b": {"kind": "classes2d", "class_average_frc_resolution_A": float("nan")},
        "c": {"kind": "classes2d", "class_average_frc_resolution_A": 30.0},
        "x": {"kind": "denoiser", "psnr": 10.0}, "y": {"kind": "denoiser", "psnr": 12.0},
    }}}
    md = markdown(results, {}, "cmd")
    assert md.index("| c |") < md.index("| a |") < md.index("| b |")  # Å: lower is better
    assert md.index("| y |") < md.index("| x |")  # PSNR: higher is better
