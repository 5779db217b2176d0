"""Known pretrained weights, the local weights cache, and verified, resumable downloads.

Files live in ``cache_dir() / "weights"`` (``$MASKRCNN_HOME`` or ``~/.cache/maskrcnn``) under the file name of
their URL. A download goes to ``<final>.part``, resumes that file with an HTTP ``Range`` request when it exists,
is checked against the entry's SHA-256 and only then is renamed to its final name, so a file under its final
name has always passed the check. ``$MASKRCNN_MIRROR`` replaces the URL's base (a URL or a local folder), for
machines that reach the weights through a mirror or a shared disk.

About the checksums: torchvision names its files ``<name>-<first 8 hex digits of the file's SHA-256>.pth`` and
checks only that prefix (``torch.hub``'s ``check_hash``). The full digests of those files are not recorded
here, because they could not be computed where this registry was written; their entries therefore hold the
8-digit prefix. detectron2 publishes no digest at all. :attr:`WeightsEntry.sha256` is a full 64-digit digest,
a prefix of one (at least 8 digits), or empty. A download is verified against it, and the file's full digest
is then recorded beside it in the cache (``<file>.sha256``). Every later load hashes the file again and
compares the whole digest with the pinned one or, for prefix-only and unpublished entries, with the recorded
one, so a cached file changed after its verified download is refused (:class:`ChecksumError`). A file
placed in the cache by hand is verified against what the entry holds and recorded on first use.

The mirror (``$MASKRCNN_MIRROR``) must be an https URL or a local folder; plain http needs the opt-in
``MASKRCNN_ALLOW_HTTP=1``. A registry file name is a bare name, so no entry can write outside the cache.

Only ``urllib`` is used, so downloading needs no package beyond the standard library (``tqdm`` draws a
progress bar when it is installed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from maskrcnn.atomic import atomic_write_text
from maskrcnn.config import COCO_PERSON_KEYPOINT_NAMES
from maskrcnn.weights.coco_names import COCO_CLASS_NAMES, CONTIGUOUS_TO_COCO_ID, TORCHVISION_COCO_CLASS_NAMES

WeightsFormat = Literal["torchvision", "detectron2", "maskrcnn"]
FORMATS: tuple[str, ...] = ("torchvision", "detectron2", "maskrcnn")

ENV_HOME = "MASKRCNN_HOME"
ENV_MIRROR = "MASKRCNN_MIRROR"
ENV_ALLOW_HTTP = "MASKRCNN_ALLOW_HTTP"
# Beside each cached file: the full SHA-256 it had when it was verified ("<digest>  <file name>").
DIGEST_SUFFIX = ".sha256"
DEFAULT_TIMEOUT = 30.0
# Shorter than this, a "prefix" would match too many files to catch a wrong or truncated download.
MIN_SHA256_PREFIX = 8
_CHUNK = 1 << 20
_USER_AGENT = "maskrcnn-hub/0.1 (+urllib)"
_HEX = re.compile(r"[0-9a-f]+")
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_CONTENT_RANGE_UNSATISFIED = re.compile(r"bytes\s+\*/(\d+)")


def _is_bare_file_name(name: str) -> bool:
    return (bool(name) and name == Path(name).name and name not in (".", "..") and not name.startswith(".")
            and "\\" not in name and "/" not in name and "\0" not in name)


class HubError(Exception):
    """Base class of the errors raised by :mod:`maskrcnn.weights.zoo`."""


class DownloadError(HubError, OSError):
    """A file could not be fetched (offline, HTTP error, timeout, dropped connection)."""


class ChecksumError(HubError):
    """A downloaded file's SHA-256 does not match its registry entry; the file has been deleted."""

    def __init__(self, message: str, expected: str, actual: str, path: Path | None = None) -> None:
        super().__init__(message)
        self.expected = expected
        self.actual = actual
        self.path = path


class UnknownWeightsError(HubError, LookupError):
    """A weights name that is neither in the registry nor an existing file."""


@dataclass(frozen=True)
class WeightsEntry:
    """One downloadable checkpoint and what is known about it.

    Fields:
        name: registry key, e.g. ``"maskrcnn_resnet50_fpn"``.
        url: where the file is published.
        sha256: the file's SHA-256 in lower-case hex, full (64 digits) or a prefix of at least 8 digits;
            verification compares only the digits given (see the module docstring). Empty when the publisher
            gives none (detectron2's zoo): the first download is then recorded beside the file
            (``<file>.sha256``), not verified.
        format: ``"torchvision"``, ``"detectron2"`` or ``"maskrcnn"`` (our own checkpoint format): which
            converter reads the file.
        preset: name of the config preset (:func:`maskrcnn.config.get_preset`) that the weights need.
        num_classes: foreground classes K, as in ``ModelConfig.num_classes`` (the classifier has K + 1 outputs).
        class_names: the K foreground names; label i -> ``class_names[i - 1]``.
        category_ids: the dataset category id of each label (label i -> ``category_ids[i - 1]``); empty when
            the label is the id (torchvision's COCO models).
        box_ap, mask_ap: published COCO val2017 AP (IoU 0.50:0.95), or ``None`` when unknown.
        description: one line for listings.
        file_name: name in the cache; defaults to the last path component of ``url``.
        kind: ``"mask_rcnn"`` (a whole model), ``"keypoint_rcnn"`` (a whole Keypoint R-CNN) or ``"backbone"``
            (ImageNet weights of the ResNet body only, to start training from: ``maskrcnn train --weights NAME``).
        keypoint_ap: published COCO val2017 keypoint AP (OKS 0.50:0.95) of a Keypoint R-CNN, else ``None``.
        keypoint_names: the names of its keypoints (index k -> ``keypoint_names[k]``).
    """

    name: str
    url: str
    sha256: str
    format: WeightsFormat
    preset: str
    num_classes: int
    class_names: tuple[str, ...] = ()
    category_ids: tuple[int, ...] = ()
    box_ap: float | None = None
    mask_ap: float | None = None
    description: str = ""
    file_name: str = ""
    kind: Literal["mask_rcnn", "keypoint_rcnn", "backbone"] = "mask_rcnn"
    keypoint_ap: float | None = None
    keypoint_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Validate the fields and fill in ``file_name``."""
        digest = self.sha256.strip().lower()
        if digest and not (MIN_SHA256_PREFIX <= len(digest) <= 64 and _HEX.fullmatch(digest)):
            raise ValueError(
                f"weights {self.name!r}: sha256 must be {MIN_SHA256_PREFIX} to 64 hex digits, got {self.sha256!r}"
            )
        if not _is_bare_file_name(self.file_name or Path(urllib.parse.urlparse(self.url).path).name):
            raise ValueError(f"weights {self.name!r}: file name {self.file_name!r} must be a plain name inside the "
                             f"cache folder (no folders, no '..', not hidden)")
        if self.format not in FORMATS:
            raise ValueError(f"weights {self.name!r}: format must be one of {FORMATS}, got {self.format!r}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"weights {self.name!r}: {len(self.class_names)} class names for {self.num_classes} classes"
            )
        # Frozen dataclass: normalised values must go through object.__setattr__.
        object.__setattr__(self, "sha256", digest)
        object.__setattr__(self, "class_names", tuple(self.class_names))
        object.__setattr__(self, "keypoint_names", tuple(self.keypoint_names))
        if not self.file_name:
            file_name = Path(urllib.parse.urlparse(self.url).path).name
            if not file_name:
                raise ValueError(f"weights {self.name!r}: cannot take a file name from URL {self.url!r}")
            object.__setattr__(self, "file_name", file_name)

    @property
    def sha256_is_prefix(self) -> bool:
        """True when only a prefix of the SHA-256 is known."""
        return 0 < len(self.sha256) < 64

    @property
    def sha256_known(self) -> bool:
        """False when the publisher gives no digest at all, so a download cannot be verified."""
        return bool(self.sha256)


def _torchvision_coco(name: str, file_hash: str, preset: str, box_ap: float, mask_ap: float,
                      description: str) -> WeightsEntry:
    """A torchvision COCO checkpoint from download.pytorch.org, whose file name carries its SHA-256 prefix."""
    return WeightsEntry(
        name=name,
        url=f"https://download.pytorch.org/models/{name}_coco-{file_hash}.pth",
        sha256=file_hash,  # prefix from the file name; the full digest is not recorded (module docstring)
        format="torchvision", preset=preset,
        num_classes=len(TORCHVISION_COCO_CLASS_NAMES), class_names=TORCHVISION_COCO_CLASS_NAMES,
        box_ap=box_ap, mask_ap=mask_ap, description=description)


# detectron2's COCO Mask R-CNN zoo: (config name, model id, file suffix, box AP, mask AP) from its MODEL_ZOO.md.
_DETECTRON2_MASK_RCNN = (
    ("mask_rcnn_R_50_C4_1x", 137259246, "9243eb", 36.8, 32.2),
    ("mask_rcnn_R_50_DC5_1x", 137260150, "4f86c3", 38.3, 34.2),
    ("mask_rcnn_R_50_FPN_1x", 137260431, "a54504", 38.6, 35.2),
    ("mask_rcnn_R_50_C4_3x", 137849525, "4ce675", 39.8, 34.4),
    ("mask_rcnn_R_50_DC5_3x", 137849551, "84107b", 40.0, 35.9),
    ("mask_rcnn_R_50_FPN_3x", 137849600, "f10217", 41.0, 37.2),
    ("mask_rcnn_R_101_C4_3x", 138363239, "a2914c", 42.6, 36.7),
    ("mask_rcnn_R_101_DC5_3x", 138363294, "0464b7", 41.9, 37.3),
    ("mask_rcnn_R_101_FPN_3x", 138205316, "a3ec72", 42.9, 38.6),
    ("mask_rcnn_X_101_32x8d_FPN_3x", 139653917, "2d9806", 44.3, 39.5),
)


def _detectron2_coco(config: str, model_id: int, suffix: str, box_ap: float, mask_ap: float) -> WeightsEntry:
    """A detectron2 model-zoo COCO Mask R-CNN (80 classes in ascending COCO id order, background last)."""
    arch = config[len("mask_rcnn_"):].rsplit("_", 1)[0].replace("_", "-")
    return WeightsEntry(
        name=f"detectron2_{config}",
        url=(f"https://dl.fbaipublicfiles.com/detectron2/COCO-InstanceSegmentation/{config}/{model_id}/"
             f"model_final_{suffix}.pkl"),
        # detectron2 publishes no digest (the file-name suffix is not a SHA-256 prefix).
        sha256="", format="detectron2", preset=config, num_classes=len(COCO_CLASS_NAMES),
        class_names=COCO_CLASS_NAMES, category_ids=CONTIGUOUS_TO_COCO_ID, box_ap=box_ap, mask_ap=mask_ap,
        description=f"Mask R-CNN {arch} ({config.rsplit('_', 1)[1]}), detectron2 model zoo (COCO train2017)",
        file_name=f"{config}_{model_id}_model_final_{suffix}.pkl")


def _keypoint_entry(name: str, url: str, sha256: str, fmt: WeightsFormat, preset: str, box_ap: float,
                    keypoint_ap: float, description: str, file_name: str = "") -> WeightsEntry:
    """A COCO person Keypoint R-CNN: one class (person, category 1) and COCO's 17 person keypoints."""
    return WeightsEntry(name=name, url=url, sha256=sha256, format=fmt, preset=preset, num_classes=1,
                        class_names=("person",), category_ids=(1,), box_ap=box_ap, description=description,
                        file_name=file_name, kind="keypoint_rcnn", keypoint_ap=keypoint_ap,
                        keypoint_names=COCO_PERSON_KEYPOINT_NAMES)


# detectron2's COCO person keypoint zoo: (config name, model id, file suffix, box AP, keypoint AP), MODEL_ZOO.md.
_DETECTRON2_KEYPOINT_RCNN = (
    ("keypoint_rcnn_R_50_FPN_1x", 137261548, "04e291", 53.6, 64.0),
    ("keypoint_rcnn_R_50_FPN_3x", 137849621, "a6e10b", 55.4, 65.5),
    ("keypoint_rcnn_R_101_FPN_3x", 138363331, "997cc7", 56.4, 66.1),
    ("keypoint_rcnn_X_101_32x8d_FPN_3x", 139686956, "5ad38f", 57.3, 66.0),
)


def _detectron2_keypoints(config: str, model_id: int, suffix: str, box_ap: float, keypoint_ap: float
                          ) -> WeightsEntry:
    """A detectron2 model-zoo COCO person Keypoint R-CNN (no published digest, as for its Mask R-CNNs)."""
    arch = config[len("keypoint_rcnn_"):].rsplit("_", 1)[0].replace("_", "-")
    return _keypoint_entry(
        f"detectron2_{config}",
        f"https://dl.fbaipublicfiles.com/detectron2/COCO-Keypoints/{config}/{model_id}/model_final_{suffix}.pkl",
        "", "detectron2", config, box_ap, keypoint_ap,
        f"Keypoint R-CNN {arch} ({config.rsplit('_', 1)[1]}), detectron2 model zoo (COCO person keypoints)",
        file_name=f"{config}_{model_id}_model_final_{suffix}.pkl")


_KEYPOINTS = (
    # torchvision's default weights; trained with FrozenBN eps 0, which torchvision restores after loading them.
    _keypoint_entry("keypointrcnn_resnet50_fpn", "https://download.pytorch.org/models/"
                    "keypointrcnn_resnet50_fpn_coco-fc266e95.pth", "fc266e95", "torchvision",
                    "keypointrcnn_resnet50_fpn_coco_v1", 54.6, 65.0,
                    "Keypoint R-CNN ResNet-50-FPN, torchvision COCO_V1 weights (COCO person keypoints)"),
    _keypoint_entry("keypointrcnn_resnet50_fpn_legacy", "https://download.pytorch.org/models/"
                    "keypointrcnn_resnet50_fpn_coco-9f466800.pth", "9f466800", "torchvision",
                    "keypointrcnn_resnet50_fpn", 50.6, 61.1,
                    "Keypoint R-CNN ResNet-50-FPN, torchvision COCO_LEGACY weights (COCO person keypoints)"),
    *(_detectron2_keypoints(*row) for row in _DETECTRON2_KEYPOINT_RCNN),
)


def _imagenet_backbone(name: str, url: str, sha256: str, fmt: WeightsFormat, preset: str,
                       description: str) -> WeightsEntry:
    """ImageNet-classification weights of a ResNet/ResNeXt body, to initialise training from."""
    return WeightsEntry(name=name, url=url, sha256=sha256, format=fmt, preset=preset, num_classes=0,
                        description=description, kind="backbone")


_D2_IMAGENET = "https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained"
_TV_MODELS = "https://download.pytorch.org/models"
_BACKBONES = (
    _imagenet_backbone("detectron2_R-50", f"{_D2_IMAGENET}/MSRA/R-50.pkl", "", "detectron2", "mask_rcnn_R_50_FPN_3x",
                       "ResNet-50 (MSRA, Caffe2 names), ImageNet: detectron2's R50 training start"),
    _imagenet_backbone("detectron2_R-101", f"{_D2_IMAGENET}/MSRA/R-101.pkl", "", "detectron2",
                       "mask_rcnn_R_101_FPN_3x", "ResNet-101 (MSRA, Caffe2 names), ImageNet: detectron2's R101 start"),
    _imagenet_backbone("detectron2_X-101-32x8d", f"{_D2_IMAGENET}/FAIR/X-101-32x8d.pkl", "", "detectron2",
                       "mask_rcnn_X_101_32x8d_FPN_3x", "ResNeXt-101 32x8d (FAIR), ImageNet: detectron2's X101 start"),
    _imagenet_backbone("resnet50_imagenet", f"{_TV_MODELS}/resnet50-0676ba61.pth", "0676ba61", "torchvision",
                       "torchvision_v1", "ResNet-50, torchvision ImageNet (IMAGENET1K_V1)"),
    _imagenet_backbone("resnet101_imagenet", f"{_TV_MODELS}/resnet101-63fe2227.pth", "63fe2227", "torchvision",
                       "torchvision_v1", "ResNet-101, torchvision ImageNet (IMAGENET1K_V1)"),
    _imagenet_backbone("resnext101_32x8d_imagenet", f"{_TV_MODELS}/resnext101_32x8d-8ba56ff5.pth", "8ba56ff5",
                       "torchvision", "torchvision_v1", "ResNeXt-101 32x8d, torchvision ImageNet (IMAGENET1K_V1)"),
)

REGISTRY: dict[str, WeightsEntry] = {e.name: e for e in (
    _torchvision_coco("maskrcnn_resnet50_fpn", "bf2d0c1e", "torchvision_v1", 37.9, 34.6,
                      "Mask R-CNN ResNet-50-FPN, torchvision v1 weights (COCO train2017)"),
    _torchvision_coco("maskrcnn_resnet50_fpn_v2", "73cbd019", "torchvision_v2", 47.4, 41.8,
                      "Mask R-CNN ResNet-50-FPN v2 (improved recipe), torchvision weights (COCO train2017)"),
    *(_detectron2_coco(*row) for row in _DETECTRON2_MASK_RCNN),
    *_KEYPOINTS,
    *_BACKBONES,
)}


def register(entry: WeightsEntry, overwrite: bool = False) -> None:
    """Add ``entry`` to :data:`REGISTRY` (refusing to replace an existing name unless ``overwrite``)."""
    if entry.name in REGISTRY and not overwrite:
        raise ValueError(f"weights {entry.name!r} are already registered; pass overwrite=True to replace them")
    REGISTRY[entry.name] = entry


def get_entry(name: str) -> WeightsEntry:
    """Return the registry entry called ``name``; the error lists the known names."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownWeightsError(f"unknown weights {name!r}; known weights: {_known_names()}") from None


def cache_dir() -> Path:
    """Root of the cache: ``$MASKRCNN_HOME`` or ``~/.cache/maskrcnn``."""
    home = os.environ.get(ENV_HOME)
    return Path(home).expanduser() if home else Path.home() / ".cache" / "maskrcnn"


def weights_dir() -> Path:
    """Folder that holds downloaded weights: ``cache_dir() / "weights"``."""
    return cache_dir() / "weights"


def weights_path(name_or_entry: str | WeightsEntry) -> Path:
    """Where the file of these weights is (or will be) cached; a file placed there by hand is verified on use."""
    entry = _as_entry(name_or_entry)
    if not _is_bare_file_name(entry.file_name):  # entries are checked when made; this guards later mutation
        raise ValueError(f"weights {entry.name!r}: file name {entry.file_name!r} would leave the cache folder")
    return weights_dir() / entry.file_name


def _check_scheme(url: str, what: str) -> None:
    """https and local files always; plain http only with MASKRCNN_ALLOW_HTTP=1; anything else never."""
    scheme = urllib.parse.urlparse(url).scheme.lower()
    if scheme in ("https", "file"):
        return
    if scheme == "http" and os.environ.get(ENV_ALLOW_HTTP, "").strip() in ("1", "true", "yes"):
        return
    hint = (f"; set {ENV_ALLOW_HTTP}=1 to allow plain http (the SHA-256 check still applies, but a prefix-only or "
            f"unpublished digest cannot catch a tampered first download)" if scheme == "http" else "")
    raise DownloadError(f"{what} {url!r} must be an https URL or a local folder{hint}")


def resolve_url(entry: WeightsEntry) -> str:
    """The URL to fetch ``entry`` from: ``entry.url``, or ``$MASKRCNN_MIRROR/<file name>`` when the mirror is set.

    A mirror without a URL scheme is taken as a local folder (read through a ``file://`` URL).
    """
    mirror = os.environ.get(ENV_MIRROR, "").strip()
    if not mirror:
        _check_scheme(entry.url, f"the URL of {entry.name!r}")
        return entry.url
    if "://" not in mirror:
        return Path(mirror).expanduser().resolve().as_uri() + "/" + urllib.parse.quote(entry.file_name)
    _check_scheme(mirror, f"${ENV_MIRROR}")
    return mirror.rstrip("/") + "/" + urllib.parse.quote(entry.file_name)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of the file at ``path``."""
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        _hash_stream(f, hasher)
    return hasher.hexdigest()


def sha256_matches(actual: str, expected: str) -> bool:
    """True when the full digest ``actual`` starts with ``expected`` (a full digest or a prefix)."""
    expected = expected.strip().lower()
    return len(expected) >= MIN_SHA256_PREFIX and actual.lower().startswith(expected)


def download(
    name_or_entry: str | WeightsEntry,
    force: bool = False,
    progress: bool = True,
    *,
    retries: int = 2,
    timeout: float = DEFAULT_TIMEOUT,
) -> Path:
    """Download weights into the cache (resuming a partial file), verify the SHA-256 and return the path.

    An already cached file is returned without a request unless ``force``. A transfer that breaks off is
    resumed up to ``retries`` times within this call; after that the ``.part`` file is kept, and the next call
    resumes it. Raises :class:`DownloadError` (the message names the URL and where a hand-downloaded file is
    picked up) or :class:`ChecksumError` (the bad file is deleted).
    """
    entry = _as_entry(name_or_entry)
    dest = weights_path(entry)
    if dest.is_file() and not force:
        return verify_cached(entry)
    part = dest.with_name(dest.name + ".part")
    url = resolve_url(entry)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot create the weights folder {dest.parent}: {exc}") from exc
    if force:
        part.unlink(missing_ok=True)

    attempts = 0
    while True:
        try:
            digest = _fetch(url, part, progress=progress, timeout=timeout, label=entry.file_name)
            break
        except _Interrupted as exc:
            attempts += 1
            if attempts > retries:
                raise DownloadError(
                    f"download of {entry.name!r} from {url} broke off after {exc.received} of "
                    f"{exc.total if exc.total is not None else '?'} bytes ({exc.reason}); the partial file is kept "
                    f"at {part} and the next call resumes it. {_manual_hint(entry, dest)}"
                ) from exc.__cause__
        except urllib.error.HTTPError as exc:
            exc.close()  # it holds the open response
            raise DownloadError(
                f"could not download {entry.name!r} from {url}: HTTP {exc.code} {exc.reason}. "
                f"{_manual_hint(entry, dest)}"
            ) from exc
        except urllib.error.URLError as exc:
            raise DownloadError(
                f"could not download {entry.name!r} from {url} (offline?): {exc.reason}. "
                f"{_manual_hint(entry, dest)}"
            ) from exc

    if entry.sha256_known and not sha256_matches(digest, entry.sha256):
        part.unlink(missing_ok=True)
        kind = "SHA-256 prefix" if entry.sha256_is_prefix else "SHA-256"
        raise ChecksumError(
            f"checksum mismatch for {entry.name!r} from {url}: expected {kind} {entry.sha256}, got {digest}; "
            f"the file was deleted",
            expected=entry.sha256,
            actual=digest,
            path=dest,
        )
    # Same folder, so the rename is atomic: readers see either no file or a verified one. The full digest is
    # recorded first: a file under its final name always has its record.
    _record_digest(dest, digest)
    os.replace(part, dest)
    return dest


def digest_path(name_or_entry: str | WeightsEntry) -> Path:
    """The file beside the cached weights that records their full SHA-256 from the verified download."""
    path = weights_path(name_or_entry)
    return path.with_name(path.name + DIGEST_SUFFIX)


def recorded_digest(name_or_entry: str | WeightsEntry) -> str | None:
    """The full SHA-256 recorded for the cached file, or None when there is no (well-formed) record."""
    path = digest_path(name_or_entry)
    try:
        digest = path.read_text(encoding="ascii").split()[0].lower()
    except (OSError, IndexError, UnicodeDecodeError):
        return None
    return digest if len(digest) == 64 and _HEX.fullmatch(digest) else None


def _record_digest(dest: Path, digest: str) -> None:
    atomic_write_text(dest.with_name(dest.name + DIGEST_SUFFIX), f"{digest}  {dest.name}\n")


def verify_cached(name_or_entry: str | WeightsEntry) -> Path:
    """Hash the cached file and compare the whole digest with the pinned or recorded one; returns its path.

    A file without a record (placed by hand, or cached by an older version) is checked against what the
    entry holds and then recorded. Raises :class:`ChecksumError` (file kept, so it can be inspected) on a
    mismatch, FileNotFoundError when nothing is cached.
    """
    entry = _as_entry(name_or_entry)
    path = weights_path(entry)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights {entry.name!r} are not cached")
    actual = sha256_file(path)
    pinned = entry.sha256 if entry.sha256_known and not entry.sha256_is_prefix else None
    recorded = recorded_digest(entry)
    expected, source = ((pinned, "the registry's pinned SHA-256") if pinned else
                        (recorded, f"the SHA-256 recorded at its verified download ({digest_path(entry)})")
                        if recorded else (None, ""))
    if expected is None and entry.sha256_known:
        expected, source = entry.sha256, "the registry's SHA-256 prefix"
    if expected is not None and not sha256_matches(actual, expected) or (
            expected is not None and len(expected) == 64 and actual != expected):
        raise ChecksumError(
            f"{path}: the cached weights {entry.name!r} have SHA-256 {actual}, but {source} is {expected}; the "
            f"file changed after it was verified (corrupted or tampered with). Delete it and download again: "
            f"maskrcnn weights download {entry.name} --force", expected=expected, actual=actual, path=path)
    if recorded != actual:
        if not entry.sha256_known and recorded is None:
            print(f"note: {entry.name!r} has no published checksum; recording the SHA-256 of {path} ({actual}) "
                  f"so that any later change is refused", file=sys.stderr)
        _record_digest(path, actual)
    return path


def check_description(name_or_entry: str | WeightsEntry) -> str:
    """What a load of these weights verifies, in words (``weights list``'s check column)."""
    entry = _as_entry(name_or_entry)
    if entry.sha256_known and not entry.sha256_is_prefix:
        return "pinned SHA-256 (the whole digest, on download and every load)"
    recorded = is_cached(entry) and recorded_digest(entry) is not None
    first = "SHA-256 prefix" if entry.sha256_known else "no published digest"
    if recorded:
        return f"recorded SHA-256 (the whole digest recorded at download, where the {first} was checked)"
    return f"{first} (full SHA-256 recorded at first download, checked on every load after)"


def find_cached(name: str | WeightsEntry) -> Path | None:
    """The cached file of the named weights, or ``None`` when it has not been downloaded."""
    path = weights_path(name)
    return path if path.is_file() else None


def is_cached(name: str | WeightsEntry) -> bool:
    """True when the named weights are in the cache."""
    return find_cached(name) is not None


def resolve_weights(name_or_path: str | os.PathLike[str] | WeightsEntry, progress: bool = True) -> Path:
    """Turn a file path or a registry name into a local file, downloading it when it is not cached.

    An existing path wins over a registry name of the same spelling. Raises :class:`UnknownWeightsError`
    for a name that is neither, and :class:`DownloadError` when the file cannot be fetched.
    """
    if isinstance(name_or_path, WeightsEntry):
        return download(name_or_path, progress=progress)  # verifies a cached file, fetches a missing one
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = os.fspath(name_or_path)
    if name in REGISTRY:
        return download(name, progress=progress)
    raise UnknownWeightsError(
        f"{name!r} is neither an existing file nor known weights; known weights: {_known_names()}"
    )


def registry_as_json() -> list[dict[str, Any]]:
    """The registry as JSON-ready dicts: every entry field, plus ``cached``, ``path`` and ``resolved_url``."""
    rows = []
    for entry in REGISTRY.values():
        row = dataclasses.asdict(entry)
        row["class_names"] = list(entry.class_names)
        row["category_ids"] = list(entry.category_ids)
        row["sha256_is_prefix"] = entry.sha256_is_prefix
        row["check"] = check_description(entry)
        row["cached"] = is_cached(entry)
        row["path"] = str(weights_path(entry))
        try:
            row["resolved_url"] = resolve_url(entry)
        except DownloadError as e:
            row["resolved_url"] = f"refused: {e}"
        rows.append(row)
    return rows


class _Interrupted(Exception):
    """A transfer that stopped before its end; the ``.part`` file holds what arrived."""

    def __init__(self, received: int, total: int | None, reason: str) -> None:
        super().__init__(reason)
        self.received = received
        self.total = total
        self.reason = reason


def _as_entry(name_or_entry: str | WeightsEntry) -> WeightsEntry:
    return name_or_entry if isinstance(name_or_entry, WeightsEntry) else get_entry(name_or_entry)


def _known_names() -> str:
    return ", ".join(sorted(REGISTRY)) or "(none)"


def _manual_hint(entry: WeightsEntry, dest: Path) -> str:
    if not entry.sha256_known:
        return (f"To install it by hand, download {entry.url} and save it as {dest} "
                f"(or set ${ENV_MIRROR} to a reachable copy).")
    check = "whose SHA-256 starts with" if entry.sha256_is_prefix else "with SHA-256"
    return (
        f"To install it by hand, download {entry.url} ({check} {entry.sha256}) and save it as {dest} "
        f"(or set ${ENV_MIRROR} to a reachable copy)."
    )


def _hash_stream(f: BinaryIO, hasher: Any) -> None:
    while chunk := f.read(_CHUNK):
        hasher.update(chunk)


def _fetch(url: str, part: Path, *, progress: bool, timeout: float, label: str) -> str:
    """Fill ``part`` with the file at ``url``, resuming what it holds; return the SHA-256 of the whole file."""
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code != 416 or not offset:
            raise
        # 416: nothing lies past our offset. Either the .part is already complete (the last run stopped
        # before the rename) or it is longer than the file; only the first can be kept.
        match = _CONTENT_RANGE_UNSATISFIED.match(exc.headers.get("Content-Range", ""))
        exc.close()
        if match and int(match.group(1)) == offset:
            return sha256_file(part)
        part.unlink()
        return _fetch(url, part, progress=progress, timeout=timeout, label=label)
    except urllib.error.URLError:
        raise
    except (OSError, http.client.HTTPException) as exc:
        # urlopen leaves errors while reading the status line unwrapped (timeouts, RemoteDisconnected);
        # wrap them so that callers can tell network failures from local disk errors.
        raise urllib.error.URLError(exc) from exc

    with response:
        status = response.status or 200  # file:// responses carry no status
        hasher = hashlib.sha256()
        if status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != offset:
                # A range we did not ask for cannot be appended; start over.
                response.close()
                part.unlink()
                return _fetch(url, part, progress=progress, timeout=timeout, label=label)
            total = int(match.group(3)) if match.group(3) != "*" else None
            if offset:
                with open(part, "rb") as f:
                    _hash_stream(f, hasher)
            mode = "ab"
        else:
            # The server sent the whole file (it ignores Range, or we asked for none): start from zero.
            offset = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            mode = "wb"

        bar = _progress_bar(total, offset, label) if progress else None
        received = offset
        try:
            with open(part, mode) as out:
                while True:
                    # Only reading is the network's fault; a failed write (disk full) must not be retried.
                    try:
                        chunk = response.read(_CHUNK)
                    except (OSError, http.client.HTTPException) as exc:
                        raise _Interrupted(received, total, f"{type(exc).__name__}: {exc}") from exc
                    if not chunk:
                        break
                    out.write(chunk)
                    received += len(chunk)
                    hasher.update(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
    if total is not None and received < total:
        raise _Interrupted(received, total, "connection closed early")
    return hasher.hexdigest()


def _progress_bar(total: int | None, initial: int, label: str) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return None
    return tqdm(
        total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
        file=sys.stderr, leave=False,
    )
