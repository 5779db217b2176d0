"""data/loader.py: seeded samples, and unreadable training images replaced deterministically."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maskrcnn.data.coco import DatasetError, ImageSizeError
from maskrcnn.data.loader import SKIPPED_KEY, SeededSamples
from maskrcnn.engine import trainer
from maskrcnn.io import ImageReadError


class FakeImages:
    """Samples 0..n-1; those in ``bad`` raise like unreadable files; odd indices are portrait, even landscape."""

    def __init__(self, n: int, bad: set[int]) -> None:
        self.n, self.bad = n, bad

    def __len__(self) -> int:
        return self.n

    def aspect_ratios(self) -> list[float]:
        return [0.5 if i % 2 else 2.0 for i in range(self.n)]

    def get_image_info(self, index: int) -> dict:
        return {"file_name": f"img{index}.jpg"}

    def get(self, index: int, generator: torch.Generator):
        if index in self.bad:
            err = ImageSizeError if index == 3 else ImageReadError
            raise err(f"img{index}.jpg: cannot decode image")
        return torch.full((1,), index), {"index": index, "draw": float(torch.rand((), generator=generator))}


def test_unreadable_sample_is_replaced_from_its_seed_alone() -> None:
    ds = SeededSamples(FakeImages(20, bad={1, 3}))
    image, target = ds[(1, 1234)]
    assert target[SKIPPED_KEY][0] == ("img1.jpg", "img1.jpg: cannot decode image")
    assert target["index"] % 2 == 1 and target["index"] not in (1, 3)  # a readable portrait image
    # Another process (or a resumed run) asking for the same (index, seed) gets the same sample.
    again = SeededSamples(FakeImages(20, bad={1, 3}))[(1, 1234)]
    assert again[1] == target and torch.equal(again[0], image)
    picks = {SeededSamples(FakeImages(20, bad={1, 3}))[(1, s)][1]["index"] for s in range(40)}
    assert len(picks) > 3  # seeds spread the replacements over the group
    assert SKIPPED_KEY not in ds[(2, 5)][1]
    assert trainer.SKIPPED_KEY == SKIPPED_KEY  # the key the trainer reads


def test_a_wrong_size_image_is_skipped_too_and_a_run_of_bad_ones_is_listed() -> None:
    ds = SeededSamples(FakeImages(6, bad={1, 3}))
    _, target = ds[(3, 7)]
    assert target[SKIPPED_KEY][0][0] == "img3.jpg"
    assert all(f in ("img1.jpg", "img3.jpg") for f, _ in target[SKIPPED_KEY])


def test_no_readable_image_left_is_a_clear_error() -> None:
    ds = SeededSamples(FakeImages(4, bad={0, 1, 2, 3}))
    with pytest.raises(DatasetError, match="could not be read and no readable replacement"):
        ds[(0, 1)]
    strict = SeededSamples(FakeImages(4, bad={0}), skip_bad_images=False)
    with pytest.raises(ImageReadError):
        strict[(0, 1)]
    assert np.isscalar(strict[(1, 1)][1]["draw"])
