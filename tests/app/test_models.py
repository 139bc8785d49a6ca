"""app.models: which model folders the service loads, and each task's default model."""

from __future__ import annotations

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
