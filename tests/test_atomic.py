"""maskrcnn.atomic: files and folders that appear complete or not at all, and the cleanup of killed writes."""

from __future__ import annotations

import json

import pytest

from maskrcnn.atomic import atomic_dir, atomic_write, atomic_write_json, remove_stale_temp


def test_failed_write_keeps_the_old_file(tmp_path):
    path = atomic_write_json(tmp_path / "m.json", {"AP": 0.5})

    def half(f):
        f.write('{"AP": 0.')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, False, half)
    assert json.loads(path.read_text()) == {"AP": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_folder_appears_complete_or_not_at_all(tmp_path):
    target = tmp_path / "model_final"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "model.safetensors").write_bytes(b"weights")
        raise RuntimeError("killed before the config")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
        (tmp / "b").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError
    assert sorted((p.name, p.read_text()) for p in target.iterdir()) == [("a", "1"), ("b", "1")]
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("3")
    assert [(p.name, p.read_text()) for p in target.iterdir()] == [("a", "3")]
    assert [p.name for p in tmp_path.iterdir()] == ["model_final"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError), atomic_dir(tmp_path / "file"):
        pass


def test_remove_stale_temp_touches_only_its_own_names(tmp_path):
    stale = [tmp_path / ".model_0000004.pt.k3j_x9qa.tmp", tmp_path / ".config.yaml.abcdef12.tmp"]
    for p in stale:
        p.write_bytes(b"partial")
    stale_dir = tmp_path / ".model_final.q1w2e3r4.tmpdir"
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"partial")
    keep = [tmp_path / "notes.tmp", tmp_path / ".hidden", tmp_path / "model_0000002.pt", tmp_path / ".x.tmp"]
    for p in keep:
        p.write_bytes(b"mine")
    removed = remove_stale_temp(tmp_path)
    assert sorted(removed) == sorted([*stale, stale_dir])
    assert sorted(tmp_path.iterdir()) == sorted(keep)
    assert remove_stale_temp(tmp_path / "absent") == []
