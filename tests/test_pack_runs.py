"""scripts/pack_runs.py: what a GPU call brings back fits the device tool's limits and holds the kept epochs
that pass KEEP_IF, best first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pack_runs.py"


def _run_folder(root: Path, name: str, epochs: dict[int, tuple[float, float]]) -> None:
    run = root / "runs" / f"g{name}"
    for sub in ("best", "best-mask"):
        (run / sub).mkdir(parents=True)
        (run / sub / "model.safetensors").write_bytes(os.urandom(1000))
        (run / sub / "manifest.json").write_text("{}")
    (run / "log.csv").write_text("epoch\n")
    (run.parent / f"g{name}.log").write_text("log\n")
    for e, (top1, mr) in epochs.items():
        d = run / "epochs" / f"{e:03d}"
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(os.urandom(1000))
        (d / "manifest.json").write_text(json.dumps({"metrics": {"top1": top1, "macro_recall": mr}}))


def _members(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def test_pack_runs_keeps_what_passes_best_first(tmp_path):
    _run_folder(tmp_path, "A", {1: (0.97, 0.91), 2: (0.96, 0.95), 3: (0.98, 0.90)})
    _run_folder(tmp_path, "B", {**{e: (0.975, 0.92) for e in range(1, 8)}, 8: (0.99, 0.93)})
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run([sys.executable, str(SCRIPT), str(out), "A", "B", "missing"], cwd=tmp_path,
                          capture_output=True, text=True, check=True)
    assert "packed 2 runs, 10 kept epochs pass" in done.stdout  # A's epoch 2 fails top-1
    assert sorted(p.name for p in out.iterdir()) == ["best.tgz", "cands-1.tgz", "cands-2.tgz", "logs.tgz",
                                                      "masks.tgz"]
    assert "runs/gA/best/model.safetensors" in _members(out / "best.tgz")
    assert "runs/gB/best-mask/model.safetensors" in _members(out / "masks.tgz")
    assert {"runs/gA/log.csv", "runs/gB.log"} <= set(_members(out / "logs.tgz"))
    first = [m for m in _members(out / "cands-1.tgz") if m.endswith("manifest.json")]
    second = [m for m in _members(out / "cands-2.tgz") if m.endswith("manifest.json")]
    assert len(first) == 6 and len(second) == 4
    assert first[0] == "runs/gB/epochs/008/manifest.json"  # highest macro recall first
    assert second[-1] == "runs/gA/epochs/003/manifest.json"  # 0.90 last
    assert "runs/gA/epochs/002/manifest.json" not in first + second
    # another rule from the environment
    for p in out.iterdir():
        p.unlink()
    subprocess.run([sys.executable, str(SCRIPT), str(out), "A"], cwd=tmp_path, check=True, capture_output=True,
                   env={**os.environ, "KEEP_IF": "macro_recall >= 0.95"})
    assert [m for m in _members(out / "cands-1.tgz") if m.endswith(".json")] == ["runs/gA/epochs/002/manifest.json"]
    assert not (out / "cands-2.tgz").exists()
