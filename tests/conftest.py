"""Shared test helpers: where the read-only reference material (../shared) lives."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _missing(reason: str) -> None:
    """Skip, or fail when $MASKRCNN_REQUIRE_FIXTURES is set (CI must run the parity tests)."""
    require_or_skip(reason, "MASKRCNN_REQUIRE_FIXTURES")


def require_or_skip(reason: str, variable: str) -> None:
    """Skip with ``reason``, or fail when the environment variable ``variable`` is set (CI needs the test to run)."""
    if os.environ.get(variable):
        pytest.fail(f"{reason} and {variable} is set")
    pytest.skip(reason)


def _shared_root() -> Path:
    return Path(os.environ.get("MASKRCNN_SHARED", REPO.parent / "shared"))


def _fixtures_root() -> Path:
    return Path(os.environ.get("MASKRCNN_FIXTURES", _shared_root() / "fixtures"))


def shared_path(*parts: str) -> Path:
    """``../shared/<parts>`` (or under $MASKRCNN_SHARED); skips, or fails under MASKRCNN_REQUIRE_FIXTURES, when absent.

    Every test that reads ../shared goes through here (or the fixtures below), so CI cannot lose a real-data
    test to a skip.
    """
    path = _shared_root().joinpath(*parts)
    if not path.exists():
        _missing(f"shared data not found at {path} (set MASKRCNN_SHARED)")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the checkout (or $MASKRCNN_SHARED); skips when absent."""
    root = _shared_root()
    if not root.is_dir():
        _missing(f"shared data not found at {root} (set MASKRCNN_SHARED)")
    return root


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """../shared/fixtures (or $MASKRCNN_FIXTURES); skips with the reason when absent."""
    root = _fixtures_root()
    if not (root / "torchvision" / "ops.pt").is_file():
        _missing(f"parity fixtures not found at {root} (set MASKRCNN_FIXTURES)")
    return root


@pytest.fixture(scope="session")
def ops_fixture(fixtures_dir: Path) -> dict:
    """The torchvision ops reference cases (ops.pt)."""
    import torch

    return torch.load(fixtures_dir / "torchvision" / "ops.pt", weights_only=True)


def assert_close_f32(actual, expected, atol: float = 1e-5, ulps: int = 2, what: str = "") -> float:
    """|actual - expected| <= atol + ulps * ulp(|expected|); returns the max absolute error.

    Some reference values were produced on a machine whose float32 ``exp`` rounds differently in the last
    bit; a box coordinate of 2500 px has an ulp of 2.4e-4, so an absolute 1e-5 alone cannot be met there.
    """
    import torch

    actual = actual.detach().to(torch.float64)
    expected_t = expected.detach()
    ulp = torch.abs(torch.nextafter(expected_t.float(), torch.tensor(float("inf"))) - expected_t.float()).double()
    expected_d = expected_t.to(torch.float64)
    err = (actual - expected_d).abs()
    bound = atol + ulps * ulp
    bad = err > bound
    assert not bool(bad.any()), (f"{what}: {int(bad.sum())} values off; max error {err.max().item():.3g} "
                                 f"(bound {atol} + {ulps} ulp)")
    return float(err.max()) if err.numel() else 0.0


def uncompressed_rle(bitmap: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE counts of an (H, W) 0/1 bitmap: column-major run lengths starting with zeros."""
    runs, cur, n = [], 0, 0
    for v in bitmap.flatten(order="F"):
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    return runs


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: on a busy 2-core runner, OpenMP threads spin-waiting on each other
    make the convolutions several times slower than a single thread does."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
