"""Real RELION / cryoDRGN / ASPIRE files from /work/shared/data/particles read correctly."""

from __future__ import annotations

import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cryosift.errors import InputError
from cryosift.io import (
    MrcStackSource,
    StarSource,
    merged_metadata,
    open_source,
    pixel_size_of,
    read_mrc_info,
    read_star,
)
from shared_data import SHARED_DATA

DATA = (SHARED_DATA / "particles").resolve()
CRYODRGN = DATA / "cryodrgn_tests"
ASPIRE = DATA / "aspire_sample"

pytestmark = pytest.mark.skipif(
    not (CRYODRGN.is_dir() and ASPIRE.is_dir()),
    reason=f"real particle files not found under {DATA} (shared data folder absent)",
)


def _mrcfile_data(path: Path) -> np.ndarray:
    """Reference read with mrcfile itself (permissive: some of these headers lack 'MAP ')."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with mrcfile.open(path, permissive=True) as m:
            return np.array(m.data, dtype=np.float32)


def _star_equals_stack(star: Path, stack: Path, n: int, box: int) -> StarSource:
    src = open_source(star)
    assert isinstance(src, StarSource)
    assert (src.n_images, src.box) == (n, box)
    direct = MrcStackSource(stack)
    via_star = np.concatenate([c for _, c in src.chunks(chunk_size=3)])
    reference = _mrcfile_data(stack)
    indices = [int(s.split("@")[0]) - 1 for s in src.metadata["rlnImageName"]]
    np.testing.assert_array_equal(via_star, direct.images(indices))
    np.testing.assert_array_equal(via_star, reference[indices])
    assert np.isfinite(via_star).all() and via_star.std() > 0
    return src


def test_relion31_with_optics() -> None:
    table = read_star(CRYODRGN / "relion31.star")
    assert table.version == "3.1"
    assert table.optics is not None and len(table.optics) == 1
    assert len(table) == 5
    assert pixel_size_of(table) == pytest.approx(2.806)
    merged = merged_metadata(table)
    assert list(merged["rlnVoltage"]) == [300.0] * 5
    assert list(merged["rlnImageName"]) == [f"{i:06d}@relion31.mrcs" for i in range(1, 6)]
    src = _star_equals_stack(CRYODRGN / "relion31.star", CRYODRGN / "relion31.mrcs", 5, 256)
    assert src.pixel_size == pytest.approx(2.806)
    # The stack header has no 'MAP ' ID, a zero machine stamp and says 1 Å/px: still readable,
    # and the STAR's 2.806 Å wins over the header's placeholder.
    info = read_mrc_info(CRYODRGN / "relion31.mrcs")
    assert (info.n, info.nx, info.mode, info.is_stack) == (5, 256, 2, True)
    assert info.pixel_size == 1.0


def test_empiar_10076_relion30_detector_pixel() -> None:
    table = read_star(CRYODRGN / "empiar_10076_7.star")
    assert table.version == "3.0" and table.optics is None and len(table) == 7
    # 5 µm detector pixel at 38168x magnification
    assert pixel_size_of(table) == pytest.approx(5e4 / 38168)
    assert pixel_size_of(table) == pytest.approx(1.31, abs=0.001)
    src = _star_equals_stack(CRYODRGN / "empiar_10076_7.star", CRYODRGN / "empiar_10076_7.mrc",
                             7, 320)
    assert src.pixel_size == pytest.approx(1.31, abs=0.001)
    # The .mrc header declares a volume (space group 1, 7 sections) and no voxel size.
    info = read_mrc_info(CRYODRGN / "empiar_10076_7.mrc")
    assert (info.n, info.nx, info.is_stack, info.pixel_size) == (7, 320, False, None)


def test_aspire_sample_model_class_block() -> None:
    table = read_star(ASPIRE / "sample_relion_data.star")
    assert table.version == "3.0" and len(table) == 17
    assert pixel_size_of(table) == pytest.approx(1.338, abs=1e-4)
    src = _star_equals_stack(ASPIRE / "sample_relion_data.star", ASPIRE / "sample.mrcs", 17, 200)
    assert src.pixel_size == pytest.approx(1.338, abs=1e-4)
    # space group 1 (volume) in the header, but the .mrcs suffix says stack; voxel size unset
    info = read_mrc_info(ASPIRE / "sample.mrcs")
    assert (info.n, info.nx, info.is_stack, info.pixel_size) == (17, 200, True, None)
    stack = open_source(ASPIRE / "sample.mrcs", pixel_size=1.338)
    assert stack.pixel_size == 1.338 and len(stack) == 17


def test_relion5_metadata_only() -> None:
    star = CRYODRGN / "relion5_metadata_only.star"
    table = read_star(star)
    assert table.version == "3.1" and len(table) == 17
    assert pixel_size_of(table) == pytest.approx(0.89)
    assert int(table.optics["rlnImageSize"].iloc[0]) == 448
    assert table.optics["rlnOddZernike"].iloc[0].startswith("[0.068")  # array-valued column
    assert set(table.particles["rlnImageName"].str.split("@").str[1]) == {
        "toy_images_a.mrcs", "toy_images_b.mrcs"}
    assert len(merged_metadata(table)) == 17
    # its stacks are not shipped: opening it as an image source is a clean, named error
    with pytest.raises(InputError, match="toy_images_a.mrcs', which does not exist") as err:
        open_source(star)
    assert "relion5_metadata_only.star" in str(err.value)


def test_sta_tilt_series_subset() -> None:
    """219 rows referencing a 220-image stack (the last image unused), 1.96 µm / 10000x."""
    star = CRYODRGN / "sta_testing_bin8.star"
    stack = CRYODRGN / "ay19102021_L3_position6_ribo_it09_bin8_1.82A.mrcs"
    src = _star_equals_stack(star, stack, 219, 64)
    assert src.pixel_size == pytest.approx(1.96)
    assert read_mrc_info(stack).n == 220
