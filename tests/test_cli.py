"""`s2amnet --help` and `s2amnet info` as real subprocesses."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# parameter counts of the published reference configurations: classify nc=10, segment nc=2, detect nc=5
REF_PARAMS = {
    "tiny": (638_834, 718_778, 2_271_335),
    "small": (1_392_442, 1_484_658, 3_140_271),
    "base": (2_439_682, 2_540_074, 4_315_127),
    "large": (5_396_626, 5_519_514, 7_588_743),
}
REF_GFLOPS_TINY = {"classify": 0.469, "segment": 2.789, "detect": 4.74}


def _cli() -> list[str]:
    exe = shutil.which("s2amnet", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "app.cli"]


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "S2AMNET_WEIGHTS_DIR": str(ROOT / "weights")}
    proc = subprocess.run(
        [*_cli(), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_help_lists_commands():
    out = _run("--help").stdout
    assert "usage: s2amnet" in out
    assert "info" in out
    out = _run("info", "--help").stdout
    assert "--json" in out and "--weights-dir" in out


def test_info_text_lists_every_variant_with_param_counts():
    out = _run("info", "--no-flops").stdout
    for variant, (cls_ref, seg_ref, det_ref) in REF_PARAMS.items():
        line = next((ln for ln in out.splitlines() if ln.startswith(variant + " ")), None)
        assert line is not None, f"no line for {variant}:\n{out}"
        numbers = [int(n.replace(",", "")) for n in re.findall(r"\d{1,3}(?:,\d{3})+", line)]
        cls_n, seg_n, det6_n, det5_n = numbers[-4:]
        assert abs(cls_n - cls_ref) <= 0.02 * cls_ref
        assert abs(seg_n - seg_ref) <= 0.02 * seg_ref
        assert abs(det5_n - det_ref) <= 0.10 * det_ref
        assert abs(det6_n - det_ref) <= 0.10 * det_ref
    assert "weights" in out


def test_info_json_with_flops_for_one_variant():
    out = _run("info", "--json", "--variant", "t").stdout
    data = json.loads(out.strip().splitlines()[-1])
    (row,) = data["variants"]
    assert row["variant"] == "tiny" and row["widths"] == [32, 64, 128, 256]
    assert row["classify"]["params"] == REF_PARAMS["tiny"][0]
    assert row["segment"]["params"] == REF_PARAMS["tiny"][1]
    assert row["detect"]["num_classes"] == 6 and row["detect"]["params_nc5"] == REF_PARAMS["tiny"][2]
    for task, ref in REF_GFLOPS_TINY.items():
        g = row[task]["gflops"]
        assert g is not None and abs(g - ref) <= 0.05 * ref, (task, g, ref)
    assert isinstance(data["weights"], list)


@pytest.mark.parametrize("bad", ["huge"])
def test_info_unknown_variant_is_an_error(bad):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [*_cli(), "info", "--variant", bad, "--no-flops"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "unknown variant" in proc.stderr


@pytest.mark.parametrize(("args", "env", "message"), [
    (["serve", "--max-queue", "0"], {}, "max_queue: Input should be greater than or equal to 1"),
    (["serve"], {"S2AMNET_MODEL_MAX_BATCH_SIZE": "crack-segment"}, "expected name=value, got 'crack-segment'"),
    (["worker", "--redis-url", "redis://127.0.0.1:1", "--model-max-batch-size", "det=0"], {},
     "model_max_batch_size.det: Input should be greater than or equal to 1"),
])
def test_bad_settings_are_a_message_and_exit_2(args, env, message):
    """A bad S2AMNET_* variable or serve/worker flag: one line naming the setting, no traceback, exit 2."""
    proc = subprocess.run([*_cli(), *args], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: invalid setting: ") and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_predict_on_cuda_without_a_gpu_is_a_message(tmp_path):
    """`--device cuda` where torch sees no GPU: a one-line JSON error naming the cause, no traceback."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from PIL import Image

    img = tmp_path / "a.png"
    Image.new("RGB", (64, 48), (90, 90, 90)).save(img)
    proc = subprocess.run([*_cli(), "predict", str(img), "--task", "detect", "--device", "cuda"], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "S2AMNET_WEIGHTS_DIR": str(ROOT / "weights")},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "torch sees no CUDA GPU" in json.loads(proc.stderr.strip().splitlines()[-1])["detail"]
    worker = subprocess.run([*_cli(), "worker", "--redis-url", "redis://127.0.0.1:1", "--device", "cuda"],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                            timeout=120)
    assert worker.returncode == 1 and "Traceback" not in worker.stderr, worker.stderr[-2000:]
    assert "start-up failed: RuntimeError: device 'cuda': torch sees no CUDA GPU" in worker.stderr
