"""app.models: which model folders the service loads, and each task's default model."""

from __future__ import annotations

import json

import pytest

from app.models import default_models, find_model_folders


def test_model_folders_by_manifest_or_folder_name(weights_dir, tmp_path):
    assert [n for n, _ in find_model_folders(weights_dir)] == ["cls", "det", "seg"]
    assert [n for n, _ in find_model_folders(weights_dir, ["det"])] == ["det"]
    with pytest.raises(RuntimeError, match=r"models \['nope'\] not found"):
        find_model_folders(weights_dir, ["nope"])
    with pytest.raises(RuntimeError, match="does not exist"):
        find_model_folders(tmp_path / "missing")
    with pytest.raises(RuntimeError, match="no model folders"):
        find_model_folders(tmp_path)


def test_the_default_model_of_a_task_is_its_first_by_name():
    class P:
        def __init__(self, task: str):
            self.task = task

    assert default_models({"b-det": P("detect"), "a-det": P("detect"), "c": P("classify")}) == {
        "detect": "a-det", "classify": "c"}


def _folder(root, name: str, manifest: str) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "manifest.json").write_text(manifest)


def test_a_broken_folder_beside_the_models_is_left_out_unless_every_model_is_loaded(tmp_path, caplog):
    from app.models import discover_models
    from app.settings import Settings

    root = tmp_path / "weights"
    _folder(root, "a-list", "[1, 2]")  # valid JSON, but not a manifest object
    _folder(root, "b-junk", "{not json")
    _folder(root, "det", json.dumps({"name": "det", "task": "detect"}))
    # loading every model (the service with no S2AMNET_MODELS): a broken folder stops it, named
    with pytest.raises(RuntimeError, match=r"a-list/manifest.json is unreadable: a JSON list, not an object"):
        find_model_folders(root)
    # the models asked for load; the broken folders beside them are logged and left out
    assert [n for n, _ in find_model_folders(root, ["det"])] == ["det"]
    # a wanted model that is itself broken is named
    with pytest.raises(RuntimeError, match="b-junk/manifest.json is unreadable"):
        find_model_folders(root, ["b-junk"])
    # choosing one model (s2amnet predict): the readable folders, the others logged
    with caplog.at_level("WARNING", logger="s2amnet.api"):
        assert [n for n, _ in discover_models(Settings(weights_dir=root))] == ["det"]
    assert "a-list/manifest.json is unreadable" in caplog.text and "b-junk/manifest.json" in caplog.text
    with pytest.raises(RuntimeError, match=r"models \['a-list'\] not found .*left out: .*a-list/manifest.json"):
        discover_models(Settings(weights_dir=root, models=["a-list"]))
