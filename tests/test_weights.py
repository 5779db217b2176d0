"""Checkpoint loading: torchvision state dicts (v1/v2), our safetensors format, overrides and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import maskrcnn
from maskrcnn.config import ConfigError, get_preset
from maskrcnn.modeling.mask_rcnn import MaskRCNN
from maskrcnn.weights import WeightsError, config_for_torchvision, detect_torchvision_variant


@pytest.fixture(scope="module")
def v1_path(fixtures_dir: Path) -> Path:
    return fixtures_dir / "torchvision" / "maskrcnn_r50_fpn_v1" / "weights.pth"


def test_torchvision_v1_is_recognised(v1_path: Path) -> None:
    state = torch.load(v1_path, weights_only=True)
    assert detect_torchvision_variant(state) == "torchvision_v1"
    cfg = config_for_torchvision(state)
    assert cfg.model.num_classes == 3 and cfg.model.backbone.norm_eps == 0.0
    model = maskrcnn.load_model(v1_path)
    p = next(model.parameters())
    assert p.dtype == torch.float32  # float16 on disk
    assert not model.training


def test_v2_keys_are_recognised() -> None:
    state = MaskRCNN(get_preset("torchvision_v2")).state_dict()
    assert detect_torchvision_variant(state) == "torchvision_v2"
    # torchvision's published v2 checkpoint carries BatchNorm counters; ours keeps them too.
    assert any(k.endswith("num_batches_tracked") for k in state)


def test_save_and_reload_round_trip(v1_path: Path, tmp_path: Path) -> None:
    model = maskrcnn.load_model(v1_path, min_size=320, max_size=512, score_threshold=0.3, detections_per_img=7)
    assert model.cfg.model.box_head.score_thresh == 0.3 and model.min_size_test == 320
    out = model.save(tmp_path / "m")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    again = maskrcnn.load_model(out)
    assert again.cfg == model.cfg
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    also = maskrcnn.load_model(out / "model.safetensors", nms_threshold=0.4)
    assert also.cfg.model.box_head.nms_thresh == 0.4


def test_missing_and_unexpected_keys_are_listed(v1_path: Path, tmp_path: Path) -> None:
    state = torch.load(v1_path, weights_only=True)
    state.pop("rpn.head.cls_logits.bias")
    state["roi_heads.extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(WeightsError) as e:
        maskrcnn.load_model(bad)
    msg = str(e.value)
    assert "rpn.head.cls_logits.bias" in msg and "roi_heads.extra.weight" in msg and str(bad) in msg


def test_bad_files_and_options(tmp_path: Path, v1_path: Path) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pth"):
        maskrcnn.load_model(junk)
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    with pytest.raises(WeightsError, match="other.pth"):
        maskrcnn.load_model(other)
    with pytest.raises(ConfigError, match="unknown load_model options: colour"):
        maskrcnn.load_model(v1_path, colour="red")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(WeightsError, match="no model.safetensors"):
        maskrcnn.load_model(empty_dir)


def test_load_by_registry_name_from_cache_and_mirror(v1_path: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A registry name resolves to the cached file, or downloads it from $MASKRCNN_MIRROR first."""
    import hashlib
    import shutil

    from maskrcnn.weights import zoo as hub

    digest = hashlib.sha256(v1_path.read_bytes()).hexdigest()
    entry = hub.WeightsEntry(name="shapes_fixture_v1", url="https://example.invalid/models/shapes_v1.pth",
                             sha256=digest, format="torchvision", preset="torchvision_v1", num_classes=3,
                             class_names=("square", "circle", "triangle"))
    monkeypatch.setitem(hub.REGISTRY, entry.name, entry)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    shutil.copy(v1_path, mirror / "shapes_v1.pth")
    monkeypatch.setenv("MASKRCNN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MASKRCNN_MIRROR", mirror.as_uri())
    model = maskrcnn.load_model("shapes_fixture_v1", min_size=320, max_size=512)
    assert hub.is_cached("shapes_fixture_v1")
    assert model.cfg.model.class_names == ("square", "circle", "triangle")
    # Offline now: the cached file is used without any download.
    monkeypatch.setenv("MASKRCNN_MIRROR", "http://127.0.0.1:9/nothing")
    again = maskrcnn.load_model("shapes_fixture_v1")
    assert torch.equal(next(again.parameters()), next(model.parameters()))
    with pytest.raises(hub.HubError, match="neither an existing file nor known weights"):
        maskrcnn.load_model("no_such_weights")


def test_save_model_folder_is_complete_or_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from maskrcnn.weights import save_model

    torch.manual_seed(0)
    model = MaskRCNN(get_preset("r18_fpn_demo"))
    real = Path.write_text

    def killed(self, *args, **kwargs):
        if self.name == "config.json":
            raise KeyboardInterrupt  # between the weights and the config
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        save_model(model, tmp_path / "fresh")
    assert list(tmp_path.iterdir()) == []  # no half folder
    monkeypatch.undo()
    save_model(model, tmp_path / "final")
    before = (tmp_path / "final" / "model.safetensors").read_bytes()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    monkeypatch.setattr(Path, "write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        save_model(model, tmp_path / "final")
    monkeypatch.undo()
    assert (tmp_path / "final" / "model.safetensors").read_bytes() == before  # the old model, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    # A folder with the user's own files in it keeps them.
    (tmp_path / "final" / "README.txt").write_text("notes")
    save_model(model, tmp_path / "final")
    assert (tmp_path / "final" / "README.txt").read_text() == "notes"
    assert maskrcnn.load_model(tmp_path / "final").model.state_dict().keys() == model.state_dict().keys()


class _RunsCode:
    """Unpickling this would call ``os.system``: every checkpoint reader must refuse before it happens."""

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_no_checkpoint_reader_unpickles_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from maskrcnn.engine.checkpoint import load_checkpoint
    from maskrcnn.weights import read_init_state

    import pickle

    bad = tmp_path / "model.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _RunsCode()}, bad)
    pkl = tmp_path / "model_final.pkl"
    pkl.write_bytes(pickle.dumps({"model": {"w": _RunsCode()}}))
    calls: list = []
    monkeypatch.setattr(os, "system", lambda cmd: calls.append(cmd) or 0)
    with pytest.raises(WeightsError, match=r"model\.pth: cannot read as a PyTorch checkpoint"):
        maskrcnn.load_model(bad)
    with pytest.raises(WeightsError):
        read_init_state(bad)
    with pytest.raises(RuntimeError, match="cannot load checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(WeightsError, match="refused to load this pickle"):
        maskrcnn.load_model(pkl)
    assert calls == []  # nothing ran
