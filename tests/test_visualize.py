"""Tests for fxrel.visualize and fxrel.sample_images."""

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fxrel import sample_images, visualize  # noqa: E402
from fxrel.sample_images import imagenet_normalize, load_image, synthetic_image  # noqa: E402
from fxrel.visualize import (  # noqa: E402
    heatmap_rgb,
    overlay,
    relevance_to_map,
    save_grid,
    save_heatmap,
)


def _signed_map() -> torch.Tensor:
    """4x4 map: +1 at (0, 0), -0.5 at (0, 1), 0 elsewhere."""
    m = torch.zeros(4, 4)
    m[0, 0] = 1.0
    m[0, 1] = -0.5
    return m


# --- relevance_to_map -------------------------------------------------------


def test_relevance_to_map_reductions():
    r = torch.randn(2, 3, 5, 6)
    assert torch.allclose(relevance_to_map(r), r.sum(dim=1))
    assert torch.allclose(relevance_to_map(r, "abs_sum"), r.abs().sum(dim=1))
    assert torch.allclose(relevance_to_map(r, "max_norm"), r.pow(2).sum(dim=1).sqrt())
    assert relevance_to_map(r[0]).shape == (5, 6)
    assert torch.equal(relevance_to_map(r[0, 0]), r[0, 0])


@pytest.mark.parametrize("shape", [(5,), (1, 1, 2, 3, 3)])
def test_relevance_to_map_rejects_bad_rank(shape):
    with pytest.raises(ValueError, match="shape"):
        relevance_to_map(torch.zeros(shape))


def test_relevance_to_map_rejects_unknown_reduction():
    with pytest.raises(ValueError, match="reduce"):
        relevance_to_map(torch.zeros(3, 4, 4), reduce="mean")


def test_nan_relevance_raises_naming_nan():
    r = torch.zeros(1, 3, 4, 4)
    r[0, 1, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        relevance_to_map(r)
    with pytest.raises(ValueError, match="NaN"):
        save_heatmap("unused.png", r)


def test_infinite_relevance_raises():
    with pytest.raises(ValueError, match="infinite"):
        heatmap_rgb(torch.tensor([[float("inf"), 0.0]]))


# --- heatmap_rgb --------------------------------------------------------------


@pytest.mark.parametrize("cmap", ["seismic", "bwr"])
def test_sign_convention_red_positive_blue_negative_white_zero(cmap):
    rgb = heatmap_rgb(_signed_map(), cmap=cmap).astype(int)
    assert rgb.shape == (4, 4, 3)
    red, green, blue = rgb[0, 0]
    assert red > blue + 100 and red > green + 100
    red, green, blue = rgb[0, 1]
    assert blue > red + 100 and blue > green + 100
    assert (rgb[1:, :] == 255).all()


def test_symmetric_normalisation_is_scale_invariant():
    m = torch.randn(16, 16)
    np.testing.assert_array_equal(heatmap_rgb(m), heatmap_rgb(7.0 * m))


def test_normalisation_is_symmetric_in_sign():
    """+R and -R give mirrored colours: red and blue channels swap."""
    m = torch.randn(8, 8)
    pos, neg = heatmap_rgb(m, cmap="bwr"), heatmap_rgb(-m, cmap="bwr")
    np.testing.assert_allclose(pos[..., 0], neg[..., 2], atol=1)


def test_all_zero_map_is_white_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rgb = heatmap_rgb(torch.zeros(8, 8))
    assert rgb.dtype == np.uint8
    assert (rgb == 255).all()


def test_gamma_keeps_sign_and_extremes():
    m = torch.tensor([[1.0, -1.0, 0.25, -0.25]])
    plain, boosted = heatmap_rgb(m).astype(int), heatmap_rgb(m, gamma=0.5).astype(int)
    np.testing.assert_array_equal(plain[0, :2], boosted[0, :2])
    assert boosted[0, 2, 1] < plain[0, 2, 1]  # weak positive becomes more saturated
    assert boosted[0, 3, 1] < plain[0, 3, 1]
    with pytest.raises(ValueError, match="gamma"):
        heatmap_rgb(m, gamma=0.0)


def test_heatmap_rgb_requires_2d():
    with pytest.raises(ValueError, match="2-D"):
        heatmap_rgb(torch.zeros(3, 4, 4))


# --- overlay ------------------------------------------------------------------


def test_overlay_blends_grayscale_image_with_heatmap():
    img = synthetic_image(32)
    heat = heatmap_rgb(torch.randn(32, 32))
    gray = overlay(img, heat, alpha=0.0)
    assert gray.dtype == np.uint8 and gray.shape == (32, 32, 3)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    np.testing.assert_array_equal(overlay(img, heat, alpha=1.0), heat)


def test_overlay_accepts_uint8_hwc_image():
    img = synthetic_image(32)
    as_uint8 = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    heat = heatmap_rgb(torch.randn(32, 32))
    diff = overlay(img, heat).astype(int) - overlay(as_uint8, heat).astype(int)
    assert np.abs(diff).max() <= 1


def test_overlay_rejects_mismatch_and_normalised_images():
    heat = heatmap_rgb(torch.randn(16, 16))
    with pytest.raises(ValueError, match="does not match"):
        overlay(synthetic_image(32), heat)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        overlay(imagenet_normalize(synthetic_image(16)), heat)


# --- saving -------------------------------------------------------------------


def test_save_heatmap_is_pixel_exact(tmp_path):
    target = tmp_path / "nested" / "dir" / "heat.png"
    assert save_heatmap(target, torch.randn(1, 3, 29, 37)) == target
    with Image.open(target) as im:
        assert im.format == "PNG"
        assert im.size == (37, 29)


def test_save_heatmap_content_matches_heatmap_rgb(tmp_path):
    r = torch.randn(3, 29, 37)
    save_heatmap(tmp_path / "heat.png", r)
    with Image.open(tmp_path / "heat.png") as im:
        saved = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(saved, heatmap_rgb(relevance_to_map(r)))


def test_save_heatmap_with_image_and_title(tmp_path):
    target = tmp_path / "pair.png"
    save_heatmap(target, torch.randn(3, 40, 40), image=synthetic_image(40), title="class 207")
    with Image.open(target) as im:
        assert im.size == (80, 40 + visualize._TITLE_HEIGHT)


def test_save_heatmap_rejects_batches(tmp_path):
    with pytest.raises(ValueError, match="batch of 2"):
        save_heatmap(tmp_path / "x.png", torch.randn(2, 3, 8, 8))
    assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken_savefig(self, *args, **kwargs):
        raise RuntimeError("renderer exploded")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(RuntimeError, match="renderer exploded"):
        save_heatmap(tmp_path / "heat.png", torch.randn(3, 8, 8))
    with pytest.raises(RuntimeError, match="renderer exploded"):
        save_grid(tmp_path / "grid.png", ["a"], ["b"], [[torch.randn(8, 8)]])
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "heat.png"
    save_heatmap(target, torch.randn(8, 8))
    before = target.read_bytes()

    def half_write_then_fail(self, fname, *args, **kwargs):
        Path(fname).write_bytes(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", half_write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_heatmap(target, torch.randn(8, 8))
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["heat.png"]


def test_save_grid_writes_labelled_figure(tmp_path):
    rows, cols = ["cat", "dog"], ["LRP-eps", "LRP-z+", "grad"]
    maps = [[torch.randn(3, 24, 24) for _ in cols] for _ in rows]
    target = save_grid(tmp_path / "grid.png", rows, cols, maps)
    per_cell = int(visualize._GRID_CELL_INCHES * visualize._GRID_DPI)
    with Image.open(target) as im:
        assert im.size == (len(cols) * per_cell, len(rows) * per_cell)

    with_inputs = save_grid(
        tmp_path / "grid_inputs.png", rows, cols, maps, images=[synthetic_image(24, s) for s in range(2)]
    )
    with Image.open(with_inputs) as im:
        assert im.size == ((len(cols) + 1) * per_cell, len(rows) * per_cell)


def test_save_grid_validates_layout(tmp_path):
    with pytest.raises(ValueError, match="2 x 1"):
        save_grid(tmp_path / "g.png", ["a", "b"], ["c"], [[torch.zeros(4, 4)]])
    with pytest.raises(ValueError, match="one image per row"):
        save_grid(tmp_path / "g.png", ["a"], ["c"], [[torch.zeros(4, 4)]], images=[])
    assert list(tmp_path.iterdir()) == []


# --- sample_images -------------------------------------------------------------


def test_synthetic_image_is_deterministic_per_seed():
    a = synthetic_image(64, seed=3)
    assert a.shape == (3, 64, 64) and a.dtype == torch.float32
    assert 0.0 <= a.min() and a.max() <= 1.0
    assert torch.equal(a, synthetic_image(64, seed=3))
    assert not torch.equal(a, synthetic_image(64, seed=4))


def test_synthetic_image_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    synthetic_image(32)
    assert torch.equal(torch.rand(4), expected)


def test_synthetic_image_has_structure():
    img = synthetic_image(224)
    assert img.std() > 0.1  # not a flat colour
    assert (img[:, :, 1:] - img[:, :, :-1]).abs().max() > 0.3  # has hard shape edges


def test_imagenet_normalize():
    img = torch.tensor(sample_images.IMAGENET_MEAN).view(3, 1, 1).expand(3, 4, 4)
    assert torch.allclose(imagenet_normalize(img), torch.zeros(3, 4, 4), atol=1e-6)
    batch = synthetic_image(16).unsqueeze(0)
    expected = (batch[0, 1] - sample_images.IMAGENET_MEAN[1]) / sample_images.IMAGENET_STD[1]
    assert torch.allclose(imagenet_normalize(batch)[0, 1], expected)
    with pytest.raises(ValueError, match="shape"):
        imagenet_normalize(torch.zeros(1, 8, 8))


def test_load_image_resizes_shorter_side_and_centre_crops(tmp_path):
    array = np.zeros((40, 120, 3), dtype=np.uint8)  # wide image: red | green | blue thirds
    array[:, :40, 0] = array[:, 40:80, 1] = array[:, 80:, 2] = 255
    Image.fromarray(array).save(tmp_path / "wide.png")
    img = load_image(tmp_path / "wide.png", 20)
    assert img.shape == (3, 20, 20) and img.dtype == torch.float32
    assert 0.0 <= img.min() and img.max() <= 1.0
    assert img[1].mean() > 0.95 and img[0].mean() < 0.05  # only the green centre survives


def test_load_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_image(tmp_path / "missing.png", 32)
    (tmp_path / "junk.png").write_bytes(b"definitely not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        load_image(tmp_path / "junk.png", 32)
