"""Tests for maskrcnn.hub (registry, cache, verified resumable downloads) and maskrcnn.coco_names.

Downloads go to an HTTP server on 127.0.0.1 started inside the test; nothing leaves the machine.
"""

from __future__ import annotations

import hashlib
import json
import random
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from maskrcnn.weights import coco_names
from maskrcnn.weights import zoo as hub

FILE_NAME = "test_weights-0123abcd.pth"
DATA = random.Random(0).randbytes(300_000)
DATA_SHA256 = hashlib.sha256(DATA).hexdigest()
TEST_NAME = "test_weights"


@dataclass
class _State:
    """What the server serves and how it misbehaves; shared with the handler threads."""

    files: dict[str, bytes] = field(default_factory=dict)
    # path -> number of body bytes to send before dropping the connection (applies once).
    drop_after: dict[str, int] = field(default_factory=dict)
    ignore_range: bool = False
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    state: _State  # set on a per-server subclass

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature of the base class
        pass  # keep pytest output clean

    def do_GET(self) -> None:
        state = self.state
        range_header = self.headers.get("Range")
        with state.lock:
            state.requests.append((self.path, range_header))
            data = state.files.get(self.path)
            drop = state.drop_after.pop(self.path, None)
        if data is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        if range_header and not state.ignore_range:
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if drop is not None:
            # Promise the whole body, send part of it, then hang up: a dropped transfer.
            self.wfile.write(body[:drop])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@dataclass
class _Server:
    state: _State
    base_url: str


@pytest.fixture
def server() -> Iterator[_Server]:
    state = _State(files={f"/models/{FILE_NAME}": DATA})
    handler = type("Handler", (_Handler,), {"state": state})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield _Server(state, f"http://127.0.0.1:{httpd.server_address[1]}/models")
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _entry(sha256: str = DATA_SHA256, name: str = TEST_NAME) -> hub.WeightsEntry:
    return hub.WeightsEntry(
        name=name,
        url=f"https://example.invalid/models/{FILE_NAME}",
        sha256=sha256,
        format="maskrcnn",
        preset="r18_fpn_demo",
        num_classes=3,
        class_names=("square", "circle", "triangle"),
        description="test weights",
    )


@pytest.fixture
def env(server: _Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> _Server:
    monkeypatch.setenv("MASKRCNN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MASKRCNN_MIRROR", server.base_url)
    monkeypatch.setenv("MASKRCNN_ALLOW_HTTP", "1")  # the test server speaks plain http on 127.0.0.1
    monkeypatch.setitem(hub.REGISTRY, TEST_NAME, _entry())
    return server


def _dest(tmp_path: Path) -> Path:
    return tmp_path / "home" / "weights" / FILE_NAME


def _part(tmp_path: Path) -> Path:
    return _dest(tmp_path).with_name(FILE_NAME + ".part")


# ----------------------------------------------------------------------------------------------- downloads


def test_download_success(env: _Server, tmp_path: Path) -> None:
    path = hub.download(TEST_NAME, progress=False)
    assert path == _dest(tmp_path)
    assert path.read_bytes() == DATA
    assert not _part(tmp_path).exists()
    assert env.state.requests == [(f"/models/{FILE_NAME}", None)]
    # Cached: no second request.
    assert hub.download(TEST_NAME) == path
    assert len(env.state.requests) == 1
    # force: fetched again.
    assert hub.download(TEST_NAME, force=True, progress=True) == path
    assert len(env.state.requests) == 2
    assert path.read_bytes() == DATA


def test_download_with_sha256_prefix(env: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(hub.REGISTRY, TEST_NAME, _entry(sha256=DATA_SHA256[:8].upper()))
    assert hub.REGISTRY[TEST_NAME].sha256_is_prefix
    assert hub.download(TEST_NAME, progress=False).read_bytes() == DATA


@pytest.mark.parametrize("expected", ["0" * 64, "deadbeef"])
def test_checksum_mismatch_deletes_file(env: _Server, tmp_path: Path, expected: str) -> None:
    with pytest.raises(hub.ChecksumError) as info:
        hub.download(_entry(sha256=expected), progress=False)
    err = info.value
    assert err.expected == expected and err.actual == DATA_SHA256
    assert expected in str(err) and DATA_SHA256 in str(err)
    assert not _dest(tmp_path).exists() and not _part(tmp_path).exists()


def test_interrupted_transfer_then_resume(env: _Server, tmp_path: Path) -> None:
    env.state.drop_after[f"/models/{FILE_NAME}"] = 1000
    with pytest.raises(hub.DownloadError) as info:
        hub.download(TEST_NAME, progress=False, retries=0)
    assert str(_part(tmp_path)) in str(info.value)
    assert _part(tmp_path).read_bytes() == DATA[:1000]
    assert not _dest(tmp_path).exists()

    path = hub.download(TEST_NAME, progress=False)
    assert path.read_bytes() == DATA
    assert not _part(tmp_path).exists()
    assert env.state.requests[-1] == (f"/models/{FILE_NAME}", "bytes=1000-")


def test_interrupted_transfer_resumes_within_one_call(env: _Server, tmp_path: Path) -> None:
    env.state.drop_after[f"/models/{FILE_NAME}"] = 5000
    assert hub.download(TEST_NAME, progress=False).read_bytes() == DATA
    assert [r for _, r in env.state.requests] == [None, "bytes=5000-"]


def test_resume_against_server_that_ignores_range(env: _Server, tmp_path: Path) -> None:
    env.state.ignore_range = True
    _part(tmp_path).parent.mkdir(parents=True)
    _part(tmp_path).write_bytes(b"stale bytes that must be discarded")
    assert hub.download(TEST_NAME, progress=False).read_bytes() == DATA
    assert env.state.requests[-1][1] is not None  # we asked for a range; the 200 made us start over
    assert not _part(tmp_path).exists()


def test_complete_part_file_is_finished_without_body(env: _Server, tmp_path: Path) -> None:
    # The previous run received everything but stopped before the rename: the server answers 416.
    _part(tmp_path).parent.mkdir(parents=True)
    _part(tmp_path).write_bytes(DATA)
    assert hub.download(TEST_NAME, progress=False).read_bytes() == DATA
    assert env.state.requests == [(f"/models/{FILE_NAME}", f"bytes={len(DATA)}-")]


def test_http_404(env: _Server, tmp_path: Path) -> None:
    env.state.files.clear()
    with pytest.raises(hub.DownloadError) as info:
        hub.download(TEST_NAME, progress=False)
    message = str(info.value)
    assert f"{env.base_url}/{FILE_NAME}" in message
    assert "404" in message
    assert str(_dest(tmp_path)) in message
    assert not _dest(tmp_path).exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASKRCNN_HOME", str(tmp_path / "home"))
    url = f"http://127.0.0.1:{_free_port()}/models"
    monkeypatch.setenv("MASKRCNN_MIRROR", url)
    monkeypatch.setenv("MASKRCNN_ALLOW_HTTP", "1")
    monkeypatch.setitem(hub.REGISTRY, TEST_NAME, _entry())
    with pytest.raises(hub.DownloadError) as info:
        hub.download(TEST_NAME, progress=False, timeout=2)
    assert f"{url}/{FILE_NAME}" in str(info.value)
    assert str(_dest(tmp_path)) in str(info.value)
    assert isinstance(info.value, OSError)
    # resolve_weights gives the same clear error.
    with pytest.raises(hub.DownloadError, match="save it as"):
        hub.resolve_weights(TEST_NAME, progress=False)


def test_local_folder_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / FILE_NAME).write_bytes(DATA)
    monkeypatch.setenv("MASKRCNN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MASKRCNN_MIRROR", str(mirror))
    monkeypatch.setitem(hub.REGISTRY, TEST_NAME, _entry())
    assert hub.resolve_url(hub.REGISTRY[TEST_NAME]).startswith("file://")
    assert hub.download(TEST_NAME, progress=False).read_bytes() == DATA


# ----------------------------------------------------------------------------------------- cache, registry


def test_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASKRCNN_HOME", str(tmp_path))
    assert hub.cache_dir() == tmp_path
    assert hub.weights_dir() == tmp_path / "weights"
    monkeypatch.delenv("MASKRCNN_HOME")
    assert hub.cache_dir() == Path.home() / ".cache" / "maskrcnn"


def test_mirror_url_rewrite(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = hub.REGISTRY["maskrcnn_resnet50_fpn"]
    monkeypatch.delenv("MASKRCNN_MIRROR", raising=False)
    assert hub.resolve_url(entry) == entry.url
    monkeypatch.setenv("MASKRCNN_MIRROR", "http://mirror.example/models/")
    monkeypatch.delenv("MASKRCNN_ALLOW_HTTP", raising=False)
    with pytest.raises(hub.DownloadError, match=r"MASKRCNN_MIRROR 'http://mirror\.example/models/' must be an https "
                                                r"URL or a local folder; set MASKRCNN_ALLOW_HTTP=1"):
        hub.resolve_url(entry)
    monkeypatch.setenv("MASKRCNN_ALLOW_HTTP", "1")
    assert hub.resolve_url(entry) == "http://mirror.example/models/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"
    monkeypatch.setenv("MASKRCNN_MIRROR", "ftp://mirror.example/models/")
    with pytest.raises(hub.DownloadError, match="must be an https URL or a local folder"):
        hub.resolve_url(entry)
    monkeypatch.setenv("MASKRCNN_MIRROR", "https://m.example/a/b")
    assert hub.resolve_url(entry) == "https://m.example/a/b/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"


def test_registry_as_json_and_cached_flag(env: _Server, tmp_path: Path) -> None:
    rows = hub.registry_as_json()
    json.dumps(rows)  # must be serialisable as is
    by_name = {row["name"]: row for row in rows}
    assert {"maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2", TEST_NAME} <= set(by_name)
    keys = {"name", "url", "sha256", "format", "cached", "preset", "num_classes", "class_names", "box_ap",
            "mask_ap", "description", "file_name", "path"}
    for row in rows:
        assert keys <= set(row)
        assert isinstance(row["cached"], bool)
    assert by_name[TEST_NAME]["cached"] is False
    assert by_name[TEST_NAME]["path"] == str(_dest(tmp_path))
    assert not hub.is_cached(TEST_NAME) and hub.find_cached(TEST_NAME) is None
    hub.download(TEST_NAME, progress=False)
    assert {r["name"]: r for r in hub.registry_as_json()}[TEST_NAME]["cached"] is True
    assert hub.is_cached(TEST_NAME) and hub.find_cached(TEST_NAME) == _dest(tmp_path)


def test_builtin_entries() -> None:
    v1 = hub.REGISTRY["maskrcnn_resnet50_fpn"]
    assert (v1.url, v1.sha256, v1.format, v1.preset) == (
        "https://download.pytorch.org/models/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth",
        "bf2d0c1e", "torchvision", "torchvision_v1",
    )
    assert (v1.box_ap, v1.mask_ap, v1.file_name) == (37.9, 34.6, "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth")
    v2 = hub.REGISTRY["maskrcnn_resnet50_fpn_v2"]
    assert (v2.sha256, v2.preset, v2.box_ap, v2.mask_ap) == ("73cbd019", "torchvision_v2", 47.4, 41.8)
    for entry in (v1, v2):
        # torchvision names its files <stem>-<sha256 prefix>.pth; the registry holds that prefix.
        assert entry.file_name.endswith(f"-{entry.sha256}.pth")
        assert entry.num_classes == 90 and entry.class_names == coco_names.TORCHVISION_COCO_CLASS_NAMES


def test_entry_validation() -> None:
    with pytest.raises(ValueError, match="sha256"):
        _entry(sha256="abc")
    with pytest.raises(ValueError, match="sha256"):
        _entry(sha256="z" * 64)
    with pytest.raises(ValueError, match="format"):
        hub.WeightsEntry("x", "http://h/x.pth", "0" * 8, "onnx", "p", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="class names"):
        hub.WeightsEntry("x", "http://h/x.pth", "0" * 8, "maskrcnn", "p", 2, ("a",))
    assert hub.sha256_matches(DATA_SHA256, DATA_SHA256[:12])
    assert not hub.sha256_matches(DATA_SHA256, DATA_SHA256[:4])  # too short to mean anything


def test_resolve_weights(env: _Server, tmp_path: Path) -> None:
    existing = tmp_path / "my.pth"
    existing.write_bytes(b"x")
    assert hub.resolve_weights(existing) == existing
    assert hub.resolve_weights(str(existing)) == existing
    assert env.state.requests == []

    path = hub.resolve_weights(TEST_NAME, progress=False)  # not cached: downloads
    assert path == _dest(tmp_path) and path.read_bytes() == DATA
    assert len(env.state.requests) == 1
    assert hub.resolve_weights(TEST_NAME) == path  # cached: no request
    assert len(env.state.requests) == 1

    with pytest.raises(hub.UnknownWeightsError) as info:
        hub.resolve_weights("no_such_weights")
    assert "no_such_weights" in str(info.value)
    assert "maskrcnn_resnet50_fpn" in str(info.value) and TEST_NAME in str(info.value)
    with pytest.raises(hub.UnknownWeightsError, match="maskrcnn_resnet50_fpn_v2"):
        hub.find_cached("no_such_weights")


def test_hand_placed_file_is_used(env: _Server, tmp_path: Path) -> None:
    _dest(tmp_path).parent.mkdir(parents=True)
    _dest(tmp_path).write_bytes(DATA)
    assert hub.resolve_weights(TEST_NAME) == _dest(tmp_path)
    assert env.state.requests == []


# ------------------------------------------------------------------------------------------------ coco_names


def test_coco_names() -> None:
    ids = coco_names.COCO_CATEGORY_IDS
    assert len(ids) == 80 and len(set(ids.values())) == 80
    assert ids["person"] == 1 and ids["bicycle"] == 2 and ids["toothbrush"] == 90
    assert ids["stop sign"] == 13 and ids["dining table"] == 67 and ids["tv"] == 72 and ids["book"] == 84
    missing = sorted(set(range(1, 91)) - set(ids.values()))
    assert missing == [12, 26, 29, 30, 45, 66, 68, 69, 71, 83]
    v1 = coco_names.COCO_V1_CATEGORIES
    assert len(v1) == 91 and v1[0] == "__background__"
    assert all(v1[i] == "N/A" for i in missing)
    assert all(v1[cid] == name for name, cid in ids.items())
    tv = coco_names.TORCHVISION_COCO_CLASS_NAMES
    assert len(tv) == 90 and tv[0] == "person" and tv[89] == "toothbrush" and tv.count("N/A") == 10
    assert list(coco_names.COCO_CLASS_NAMES) == [n for n in tv if n != "N/A"]
    assert [coco_names.COCO_ID_TO_NAME[c] for c in coco_names.CONTIGUOUS_TO_COCO_ID] == list(
        coco_names.COCO_CLASS_NAMES
    )


# ------------------------------------------------------------------------------------ end-to-end verification


@pytest.mark.parametrize("pinned", ["full", "prefix", "none"])
def test_tampered_cached_file_is_refused_on_load(env: _Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 pinned: str) -> None:
    sha = {"full": DATA_SHA256, "prefix": DATA_SHA256[:8], "none": ""}[pinned]
    monkeypatch.setitem(hub.REGISTRY, TEST_NAME, _entry(sha256=sha))
    path = hub.resolve_weights(TEST_NAME, progress=False)
    # The verified download records the file's whole digest beside it, whatever the registry holds.
    assert hub.recorded_digest(TEST_NAME) == DATA_SHA256
    assert hub.resolve_weights(TEST_NAME) == path  # unchanged: loads
    data = bytearray(path.read_bytes())
    data[150_000] ^= 1  # one flipped bit
    path.write_bytes(bytes(data))
    with pytest.raises(hub.ChecksumError, match=r"changed after it was verified.*weights download test_weights "
                                                r"--force") as info:
        hub.resolve_weights(TEST_NAME)
    assert str(path) in str(info.value) and path.exists()  # kept for inspection
    with pytest.raises(hub.ChecksumError):
        hub.download(TEST_NAME, progress=False)  # a cached file is verified here too
    assert hub.download(TEST_NAME, progress=False, force=True).read_bytes() == DATA


def test_prefix_entry_is_checked_against_the_whole_recorded_digest(env: _Server, monkeypatch) -> None:
    """A record that agrees on the published 8 digits but not on the other 56 is a mismatch."""
    monkeypatch.setitem(hub.REGISTRY, TEST_NAME, _entry(sha256=DATA_SHA256[:8]))
    hub.download(TEST_NAME, progress=False)
    hub.digest_path(TEST_NAME).write_text(DATA_SHA256[:8] + "f" * 56 + "  x\n")
    with pytest.raises(hub.ChecksumError):
        hub.resolve_weights(TEST_NAME)


def test_hand_placed_file_without_published_digest_is_recorded(env: _Server, tmp_path: Path, monkeypatch,
                                                               capsys) -> None:
    monkeypatch.setitem(hub.REGISTRY, TEST_NAME, _entry(sha256=""))
    _dest(tmp_path).parent.mkdir(parents=True)
    _dest(tmp_path).write_bytes(DATA)
    assert "check" in hub.check_description(TEST_NAME) and "first download" in hub.check_description(TEST_NAME)
    assert hub.resolve_weights(TEST_NAME) == _dest(tmp_path)
    assert "no published checksum; recording" in capsys.readouterr().err
    assert hub.recorded_digest(TEST_NAME) == DATA_SHA256
    assert hub.check_description(TEST_NAME).startswith("recorded SHA-256 (the whole digest recorded at download")
    _dest(tmp_path).write_bytes(DATA[:-1])
    with pytest.raises(hub.ChecksumError):
        hub.resolve_weights(TEST_NAME)


def test_weights_list_says_which_check_each_entry_gets() -> None:
    rows = {r["name"]: r for r in hub.registry_as_json()}
    assert rows["maskrcnn_resnet50_fpn"]["check"].startswith("SHA-256 prefix")
    assert rows["detectron2_mask_rcnn_R_50_FPN_3x"]["check"].startswith("no published digest")
    assert all(r["check"] for r in rows.values())


@pytest.mark.parametrize("bad", ["../../evil.pth", "/etc/evil.pth", "sub/x.pth", ".hidden.pth", "..", "a\\b.pth"])
def test_registry_file_name_cannot_leave_the_cache(bad: str) -> None:
    with pytest.raises(ValueError, match="file name"):
        hub.WeightsEntry(name="x", url="https://example.invalid/x.pth", sha256="", format="maskrcnn",
                         preset="r18_fpn_demo", num_classes=3, file_name=bad)
    with pytest.raises(ValueError, match="file name"):
        hub.WeightsEntry(name="x", url="https://example.invalid/models/..", sha256="", format="maskrcnn",
                         preset="r18_fpn_demo", num_classes=3)


def test_weights_list_cli_check_column(env: _Server, monkeypatch, capsys) -> None:
    from maskrcnn.cli import main

    monkeypatch.setitem(hub.REGISTRY, TEST_NAME, _entry(sha256=DATA_SHA256[:8]))
    monkeypatch.setitem(hub.REGISTRY, "test_full", _entry(name="test_full"))
    assert main(["weights", "list"]) == 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines() if ln.strip()}
    assert "SHA-256 prefix" in lines[TEST_NAME] and "pinned SHA-256" in lines["test_full"]
    assert "no published digest" in lines["detectron2_mask_rcnn_R_50_FPN_3x"]
    hub.download(TEST_NAME, progress=False)
    assert main(["weights", "list"]) == 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines() if ln.strip()}
    assert "recorded SHA-256" in lines[TEST_NAME]
