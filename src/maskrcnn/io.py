"""Reading images from disk as RGB uint8 arrays, expanding file/folder/glob arguments to image lists, and
reading ahead of the model in a background thread (``prefetch``)."""

from __future__ import annotations

import glob
import queue
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

T = TypeVar("T")

# Lower-case suffixes that ``list_images`` treats as images when it expands folders and patterns.
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm",
)

# EXIF orientation values (tag 0x0112) that rotate by 90 degrees and so swap width and height.
_EXIF_ORIENTATION_TAG = 0x0112
_EXIF_TRANSPOSED = (5, 6, 7, 8)
# 65535 / 257 == 255: maps the full 16-bit range onto the full 8-bit range.
_U16_TO_U8 = 257.0


class ImageReadError(ValueError):
    """An image file that is missing, empty or cannot be decoded; the message names the file."""


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ImageReadError(f"{path}: image file not found")
    if path.is_dir():
        raise ImageReadError(f"{path}: is a directory, not an image file")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: image file is empty (0 bytes)")


def _open(path: Path) -> Image.Image:
    _check_file(path)
    try:
        img = Image.open(path)
    except UnidentifiedImageError:
        raise ImageReadError(f"{path}: not a recognised image format") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"{path}: cannot open image: {e}") from e
    return img


def _to_rgb_uint8(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (and 32-bit integer, which Pillow uses for 16-bit PNGs) greyscale: scale the 16-bit range to 8.
        arr = np.asarray(img).astype(np.float64)
        arr = np.clip(np.rint(arr / _U16_TO_U8), 0, 255).astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2)
    if mode == "F":
        # Float greyscale has no fixed range; values are taken as 0..255 intensities.
        arr = np.clip(np.rint(np.asarray(img, dtype=np.float64)), 0, 255).astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2)
    if mode != "RGB":
        # Pillow converts L, 1, P (incl. transparency), LA, RGBA (alpha dropped), CMYK, YCbCr, LAB, HSV to RGB.
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)  # read-only: a view of the decoder's bytes (read_image copies it)


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB after applying its EXIF orientation; raises ImageReadError."""
    path = Path(path)
    img = _open(path)
    try:
        with img:
            img.load()
            try:
                ImageOps.exif_transpose(img, in_place=True)  # no copy of a photo that needs no turning
            except TypeError:  # Pillow < 9.4 has no in_place
                img = ImageOps.exif_transpose(img)
            arr = _to_rgb_uint8(img)
            del img
    except ImageReadError:
        raise
    except Exception as e:  # noqa: BLE001 - decoders raise many types; report any with the file name
        raise ImageReadError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e
    # Made writable only now that the decoder's own buffer is gone: a 12000x9000 photo peaks at 0.76 GB here
    # rather than 1.5 GB.
    return arr if arr.flags.writeable else arr.copy()


def read_image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) in pixels of an image file after EXIF orientation, read from its header only."""
    path = Path(path)
    img = _open(path)
    with img:
        width, height = img.size
        try:
            orientation = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
        except Exception:  # noqa: BLE001 - a broken EXIF block means no rotation, as exif_transpose treats it
            orientation = 1
    if orientation in _EXIF_TRANSPOSED:
        width, height = height, width
    return int(height), int(width)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _has_magic(text: str) -> bool:
    return any(c in text for c in "*?[")


def list_images(sources: Iterable[str | Path], recursive: bool = False) -> list[Path]:
    """Expand image files, folders (images inside, sub-folders when recursive) and glob patterns; sorted, unique."""
    found: dict[Path, Path] = {}
    for source in sources:
        text = str(source)
        if _has_magic(text) and not Path(text).exists():
            # A pattern that matches nothing yields nothing; folders it matches are expanded like named folders.
            candidates = []
            for m in sorted(Path(m) for m in glob.glob(text, recursive=recursive)):
                candidates.extend(_folder_images(m, recursive) if m.is_dir() else [m] if _is_image(m) else [])
        else:
            p = Path(text)
            if p.is_dir():
                candidates = _folder_images(p, recursive)
            elif p.is_file():
                candidates = [p]  # a file named explicitly is taken whatever its suffix
            else:
                raise FileNotFoundError(f"{p}: no such image file or folder")
        for c in candidates:
            found.setdefault(c.resolve(), c)
    return sorted(found.values())


def _folder_images(folder: Path, recursive: bool) -> list[Path]:
    pattern = "**/*" if recursive else "*"
    return [p for p in folder.glob(pattern) if _is_image(p)]


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yield ``items`` in order while a background thread produces up to ``depth`` ahead of the consumer.

    Image decoding (PIL releases the GIL) then overlaps the model's forward pass. An exception raised while
    producing is re-raised here at the point of the item it replaced; closing this generator early stops the
    thread.
    """
    if depth < 1:
        yield from items
        return
    slots: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            put(("error", e))
            return
        put(("done", None))

    worker = threading.Thread(target=produce, name="maskrcnn-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = slots.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        worker.join(timeout=5.0)


def to_chw_tensor(image: Any) -> torch.Tensor:
    """A path, or an HWC/CHW uint8/float array or tensor (RGB, grey or RGBA) -> (3, H, W) tensor, dtype kept.

    Paths are decoded with :func:`read_image` (EXIF orientation applied, RGB uint8). Grey images are repeated to
    three channels and an alpha channel is dropped.
    """
    path = None
    if isinstance(image, (str, Path)):
        path = str(image)
        image = read_image(image)
    if isinstance(image, np.ndarray):
        arr = np.ascontiguousarray(image)
        t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    else:
        t = image
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"unsupported image type {type(t).__name__}; expected a path, numpy array or tensor")
    if t.dim() == 2:
        t = t[None]
    if t.dim() != 3:
        where = f" ({path})" if path else ""
        raise ValueError(f"image must have 2 or 3 dimensions, got shape {tuple(t.shape)}{where}")
    if t.shape[0] not in (1, 3) and t.shape[-1] in (1, 3, 4):
        t = t.permute(2, 0, 1)
    if t.shape[0] == 4:
        t = t[:3]
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    if t.shape[0] != 3:
        raise ValueError(f"cannot tell the channel axis of an image of shape {tuple(t.shape)}")
    if t.dtype != torch.uint8 and not t.is_floating_point():
        raise TypeError(f"unsupported image dtype {t.dtype}; expected uint8 or floating point")
    return t


def to_chw_float(image: Any) -> torch.Tensor:
    """Like :func:`to_chw_tensor`, then float32 RGB in [0, 1] (uint8 divided by 255; float kept as is)."""
    t = to_chw_tensor(image)
    return t.to(torch.float32).div(255) if t.dtype == torch.uint8 else t.to(torch.float32)
