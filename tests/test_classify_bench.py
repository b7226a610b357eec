"""Clustering benchmark scorers (B2/B4 with view labels, B5 class averages vs clean projections)."""

from __future__ import annotations

import numpy as np
import pytest

from cryosift.bench.clustering import score_classes_realistic, score_clusterers
from cryosift.bench.protocol import DatasetSpec
from cryosift.bench.runner import BenchData, score_views_oracle
from cryosift.io import merged_metadata, open_source, read_star
from cryosift.simulate import SimulationConfig, simulate
from sim_helpers import data_file


def _bench_data(out, spec: DatasetSpec) -> BenchData:
    cfg = SimulationConfig(
        n_images=spec.n_images, box=spec.box, pixel_size=spec.pixel_size, snr=spec.snr,
        views=spec.views, in_plane=spec.in_plane, max_shift=spec.max_shift, ctf=spec.ctf,
        seed=spec.seed,
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRYOSIFT_NO_PROGRESS", "1")
        res = simulate(data_file("structures", spec.structure), out, cfg)
    return BenchData(
        spec,
        open_source(res.star).images(slice(None)),
        open_source(res.clean).images(slice(None)),
        merged_metadata(read_star(res.star)),
        spec.pixel_size,
    )


@pytest.mark.slow
def test_views_benchmark_scores_every_clusterer_beside_the_oracle(tmp_path, monkeypatch):
    monkeypatch.setenv("CRYOSIFT_NO_PROGRESS", "1")
    spec = DatasetSpec("5F9R.pdb", 200, 40, 4.8, 0.1, views=4, in_plane=False, seed=21,
                       tasks=("views",))
    data = _bench_data(tmp_path, spec)
    scores = score_clusterers(data, quick=True, only=["pca+kmeans", "align2d", "cwf+kmeans"])
    assert set(scores) == {"pca+kmeans", "align2d", "cwf+kmeans"}
    oracle = score_views_oracle(data)["nearest_view_oracle"]
    for name, s in scores.items():
        assert s["kind"] == "clusterer" and not s["oracle"]
        assert s["acc"] > 0.8, name
        assert 0 < s["min_max_class_ratio"] <= 1
        assert np.isfinite(s["class_average_frc_resolution_A"])
        # no clusterer's averages can be much sharper than the true groups' averages
        assert s["class_average_frc_resolution_A"] > 0.8 * oracle[
            "class_average_frc_resolution_A"]


@pytest.mark.slow
def test_realistic_benchmark_scores_class_averages(tmp_path, monkeypatch):
    monkeypatch.setenv("CRYOSIFT_NO_PROGRESS", "1")
    spec = DatasetSpec("5F9R.pdb", 200, 48, 4.0, 0.2, max_shift=2.0, ctf=True, seed=22,
                       tasks=("classes",))
    data = _bench_data(tmp_path, spec)
    scores = score_classes_realistic(data, quick=True, only=["pca+kmeans", "align2d"])
    assert set(scores) == {"pca+kmeans", "align2d"}
    for s in scores.values():
        assert s["kind"] == "classes2d" and s["k"] == 10
        assert np.isfinite(s["class_average_frc_resolution_A"])
        assert 0 < s["angular_spread_deg"] < 90
    # align2d's aligned classes are tighter in viewing direction than unaligned k-means
    assert scores["align2d"]["angular_spread_deg"] < scores["pca+kmeans"]["angular_spread_deg"]
