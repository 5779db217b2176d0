"""Tests for maskrcnn.visualize: overlay shapes and dtypes, where pixels change, label contrast and placement."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from maskrcnn import visualize as vis
from maskrcnn.structures import Result


def make_result(h: int = 60, w: int = 80) -> Result:
    """Two rectangular detections with masks, plus one low-score detection."""
    masks = torch.zeros(3, h, w, dtype=torch.bool)
    masks[0, 10:30, 10:40] = True
    masks[1, 25:50, 30:70] = True
    masks[2, 40:55, 5:20] = True
    boxes = torch.tensor([[10, 10, 40, 30], [30, 25, 70, 50], [5, 40, 20, 55]], dtype=torch.float32)
    return Result(boxes=boxes, scores=torch.tensor([0.93, 0.81, 0.2]), labels=torch.tensor([1, 2, 1]),
                  masks=masks, image_size=(h, w), class_names_table=("cat", "dog"))


def grey(h: int = 60, w: int = 80, v: int = 128) -> np.ndarray:
    return np.full((h, w, 3), v, dtype=np.uint8)


def test_shape_dtype_and_input_untouched():
    img = grey()
    before = img.copy()
    out = vis.draw_result(img, make_result())
    assert out.shape == (60, 80, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(img, before)
    assert (out != img).any()


def test_masks_change_exactly_the_mask_pixels():
    res = make_result()
    img = grey()
    out = vis.draw_result(img, res, show_boxes=False, show_labels=False)
    changed = (out != img).any(-1)
    union = res.masks.any(0).numpy()
    np.testing.assert_array_equal(changed, union)


def test_mask_blend_colour_and_contour():
    res = make_result().filter(torch.tensor([0]))
    img = grey()
    out = vis.draw_result(img, res, show_boxes=False, show_labels=False, alpha=0.5, line_width=1)
    color = np.array(vis.color_for(0))
    inner = out[15:25, 15:35].reshape(-1, 3)  # interior, away from the contour
    expected = np.rint(128 * 0.5 + color * 0.5)
    assert (np.abs(inner - expected) <= 1).all()
    np.testing.assert_array_equal(out[10, 20], color)  # top edge of the mask carries the full-colour contour


def test_changes_outside_masks_stay_in_boxes_and_labels():
    res = make_result()
    img = grey(120, 160)
    masks = torch.zeros(3, 120, 160, dtype=torch.bool)
    masks[:, :60, :80] = res.masks
    res = Result(res.boxes, res.scores, res.labels, masks, image_size=(120, 160),
                 class_names_table=res.class_names_table)
    lw, fs = 2, 12
    out = vis.draw_result(img, res, line_width=lw, font_size=fs)
    changed = (out != img).any(-1)
    allowed = masks.any(0).numpy().copy()
    draw = ImageDraw.Draw(Image.fromarray(img))
    font = vis._load_font(fs)
    names = res.class_names
    for i, (x0, y0, x1, y1) in enumerate(res.boxes.round().int().tolist()):
        allowed[y0:y1 + 1, x0:x1 + 1] = True  # PIL draws outlines inward from the box edge
        left, top, right, bottom = vis._text_extent(draw, f"{names[i]} {res.scores[i]:.2f}", font)
        rx0, ry0, rx1, ry1 = vis._label_rect((right - left, bottom - top), max(1, fs // 6), res.boxes[i], 120, 160)
        allowed[ry0:ry1 + 1, rx0:rx1 + 1] = True
    assert changed.any()
    assert not (changed & ~allowed).any()


def test_score_threshold_keeps_colours():
    res = make_result()
    full = vis.draw_result(grey(), res, show_boxes=False, show_labels=False)
    high = vis.draw_result(grey(), res, score_threshold=0.5, show_boxes=False, show_labels=False)
    only_low = res.masks[2] & ~res.masks[0] & ~res.masks[1]
    assert (high[only_low.numpy()] == 128).all()
    only_first = (res.masks[0] & ~res.masks[1]).numpy()
    np.testing.assert_array_equal(full[only_first], high[only_first])


def test_text_colour_contrast_rule():
    assert vis.text_color_for((0, 0, 0)) == (255, 255, 255)
    assert vis.text_color_for((255, 255, 255)) == (0, 0, 0)
    assert vis.text_color_for((255, 225, 25)) == (0, 0, 0)  # yellow
    assert vis.text_color_for((0, 0, 128)) == (255, 255, 255)  # navy
    assert vis.text_color_for((128, 0, 0)) == (255, 255, 255)  # maroon
    assert vis.text_color_for((70, 240, 240)) == (0, 0, 0)  # cyan
    for c in vis.PALETTE:  # whatever is chosen reaches WCAG's 4.5:1 on every palette colour
        lum = vis._relative_luminance(c)
        t = vis._relative_luminance(vis.text_color_for(c))
        hi, lo = max(lum, t), min(lum, t)
        assert (hi + 0.05) / (lo + 0.05) >= 4.5, c


@pytest.mark.parametrize("bg", [0, 255])
def test_label_is_drawn_readably_on_dark_and_light(bg):
    h, w = 100, 200
    boxes = np.array([[20.0, 50.0, 120.0, 90.0], [40.0, 60.0, 150.0, 95.0]])
    colors = [(255, 225, 25), (0, 0, 128)]  # one light, one dark label background
    texts = ["cat 0.93", "dog 0.50"]
    fs = 16
    out = vis.draw_instances(grey(h, w, bg), boxes, None, texts, colors=colors, font_size=fs, show_boxes=False)
    draw = ImageDraw.Draw(Image.fromarray(out))
    font = vis._load_font(fs)
    for box, color, text in zip(boxes, colors, texts):
        left, top, right, bottom = vis._text_extent(draw, text, font)
        x0, y0, x1, y1 = vis._label_rect((right - left, bottom - top), max(1, fs // 6), box, h, w)
        patch = out[y0:y1 + 1, x0:x1 + 1].reshape(-1, 3)
        bg_px = (patch == np.array(color)).all(-1).mean()
        ink = (patch == np.array(vis.text_color_for(color))).all(-1).sum()
        assert bg_px > 0.4  # the filled background box is there
        assert ink > 10  # and so is text in the contrasting colour


def test_labels_stay_inside_the_image():
    h, w = 40, 60
    fs = 12
    # a box at the top edge (no room above) and one at the right edge (label would overflow)
    boxes = np.array([[5.0, 0.0, 30.0, 20.0], [55.0, 25.0, 60.0, 39.0]])
    texts = ["person 0.99", "giraffe 0.75"]
    draw = ImageDraw.Draw(Image.new("RGB", (w, h)))
    font = vis._load_font(fs)
    for box, text in zip(boxes, texts):
        left, top, right, bottom = vis._text_extent(draw, text, font)
        x0, y0, x1, y1 = vis._label_rect((right - left, bottom - top), 2, box, h, w)
        assert 0 <= x0 <= x1 < w and 0 <= y0 <= y1 < h
    assert vis._label_rect((20, 10), 2, (5.0, 0.0, 30.0, 20.0), h, w)[1] == 0  # inside the box, not above it
    assert vis._label_rect((20, 10), 2, (5.0, 30.0, 30.0, 39.0), h, w)[1] == 30 - 14  # above when there is room
    out = vis.draw_instances(grey(h, w), boxes, None, texts, font_size=fs)
    assert out.shape == (h, w, 3)


def test_empty_result():
    img = grey()
    empty = Result(boxes=torch.zeros(0, 4), scores=torch.zeros(0), labels=torch.zeros(0, dtype=torch.long),
                   masks=torch.zeros(0, 60, 80, dtype=torch.bool), image_size=(60, 80))
    out = vis.draw_result(img, empty)
    np.testing.assert_array_equal(out, img)
    no_masks = Result(boxes=torch.zeros(0, 4), scores=torch.zeros(0), labels=torch.zeros(0, dtype=torch.long))
    np.testing.assert_array_equal(vis.draw_result(img, no_masks), img)


def test_float_chw_tensor_input_matches_uint8():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    chw_float = torch.from_numpy(img).permute(2, 0, 1).float() / 255.0
    chw_uint8 = torch.from_numpy(img).permute(2, 0, 1)
    res = make_result()
    ref = vis.draw_result(img, res)
    np.testing.assert_array_equal(vis.draw_result(chw_uint8, res), ref)
    assert np.abs(vis.draw_result(chw_float, res).astype(int) - ref).max() <= 1


def test_result_plot_uses_draw_result():
    res = make_result()
    np.testing.assert_array_equal(res.plot(grey()), vis.draw_result(grey(), res))


def test_sizes_scale_with_image():
    assert vis.default_line_width(100, 100) < vis.default_line_width(2000, 2000)
    assert vis.default_font_size(100, 100) < vis.default_font_size(2000, 2000)
    assert vis.default_line_width(10, 10) >= 1 and vis.default_font_size(10, 10) >= 9


def test_palette_deterministic_and_distinct():
    assert vis.color_for(3) == vis.color_for(3 + len(vis.PALETTE))
    cols = np.array(vis.PALETTE, dtype=float)
    d = np.sqrt(((cols[:, None] - cols[None]) ** 2).sum(-1))
    assert d[~np.eye(len(cols), dtype=bool)].min() > 40


def test_mismatched_mask_size_raises():
    with pytest.raises(ValueError):
        vis.draw_result(grey(30, 30), make_result())


def test_save_mask_pngs(tmp_path):
    res = make_result()
    paths = vis.save_mask_pngs(res, tmp_path / "m", "img1")
    assert [p.name for p in paths] == ["img1_000_cat.png", "img1_001_dog.png", "img1_002_cat.png"]
    for p, m in zip(paths, res.masks):
        back = np.asarray(Image.open(p)).astype(bool)
        np.testing.assert_array_equal(back, m.numpy())


def _as_crops(masks: torch.Tensor, pad: int = 3):
    """The same masks as MaskCrops over loose windows (their bounding boxes grown by ``pad``)."""
    from maskrcnn.ops.masks import MaskCrops

    h, w = masks.shape[1:]
    crops, offsets = [], []
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        y0, x0 = max(int(ys.min()) - pad, 0), max(int(xs.min()) - pad, 0)
        y1, x1 = min(int(ys.max()) + 1 + pad, h), min(int(xs.max()) + 1 + pad, w)
        crops.append(m[y0:y1, x0:x1].clone())
        offsets.append([x0, y0])
    return MaskCrops.from_crops(crops, torch.tensor(offsets), (h, w))


def test_crops_draw_like_dense_masks_in_any_band_height(monkeypatch, tmp_path):
    """Overlapping masks blend in the same order with the same arithmetic, whichever row bands split them."""
    res = make_result()
    img = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    reference = vis.draw_result(img, res)
    cropped = Result(res.boxes, res.scores, res.labels, _as_crops(res.masks), image_size=res.image_size,
                     class_names_table=res.class_names_table)
    for band in (7, 25, 512):
        monkeypatch.setattr(vis, "_BLEND_BAND_ROWS", band)
        np.testing.assert_array_equal(vis.draw_result(img, cropped), reference)
        np.testing.assert_array_equal(vis.draw_result(img, res), reference)
    np.testing.assert_array_equal(vis.draw_result(img, cropped, score_threshold=0.5),
                                  vis.draw_result(img, res, score_threshold=0.5))
    paths = vis.save_mask_pngs(cropped, tmp_path, "x")
    for p, m in zip(paths, res.masks):
        assert np.array_equal(np.asarray(Image.open(p)), m.numpy())
