"""Pack the runs of scripts/gpu_parallel_runs.sh into $OUT within the device tool's limits on what comes back
(at most 8 files, 16 MiB each): logs.tgz (every run's log, log.csv, curves, config and best manifests),
best.tgz (every run's best/ weights), masks.tgz (classify runs' best-mask/: the auxiliary mask head as a
segmenter, best by its own val mIoU; session 15 lost two above mt-segment 1.0.0 without it) and cands-1.tgz,
cands-2.tgz (kept epochs, `--keep-epochs`, whose val metrics pass KEEP_IF, a Python expression over the
manifest's metrics; the best by macro recall, then top-1, six to a file). Each file is written beside and
renamed into place, so a call cut off keeps the last whole one.

    python3 scripts/pack_runs.py OUT NAME [NAME ...]      (runs/gNAME, runs/gNAME.log)
"""

from __future__ import annotations

import json
import os
import sys
import tarfile
from pathlib import Path

PER_FILE, FILES = 6, 2


def _tar(dest: Path, paths: list[Path]) -> None:
    tmp = dest.with_name("." + dest.name)
    with tarfile.open(tmp, "w:gz") as tar:
        for p in paths:
            if p.exists():
                tar.add(p)
    os.replace(tmp, dest)


def main(out: str, names: list[str]) -> None:
    out = Path(out)
    runs = [Path(f"runs/g{n}") for n in names if Path(f"runs/g{n}").is_dir()]
    small = [p for r in runs for p in (r / "log.csv", r / "curves.png", r / "config.json", r / "best" / "manifest.json",
                                       r / "best-mask" / "manifest.json", r.with_suffix(".log"))]
    _tar(out / "logs.tgz", small)
    _tar(out / "best.tgz", [r / "best" for r in runs])
    if any((r / "best-mask").is_dir() for r in runs):
        _tar(out / "masks.tgz", [r / "best-mask" for r in runs])
    keep_if = os.environ.get("KEEP_IF", "top1 >= 0.97 and macro_recall >= 0.90")
    cands = []
    for r in runs:
        for m in sorted((r / "epochs").glob("*/manifest.json")):
            metrics = json.loads(m.read_text())["metrics"]
            if eval(keep_if, {}, dict(metrics)):
                cands.append((metrics.get("macro_recall", 0), metrics.get("top1", 0), m.parent))
    cands.sort(key=lambda c: (c[0], c[1]), reverse=True)
    for i in range(FILES):
        chunk = [c[2] for c in cands[i * PER_FILE:(i + 1) * PER_FILE]]
        if chunk:
            _tar(out / f"cands-{i + 1}.tgz", chunk)
    print(f"packed {len(runs)} runs, {len(cands)} kept epochs pass {keep_if!r}"
          + (f" ({len(cands) - PER_FILE * FILES} left out)" if len(cands) > PER_FILE * FILES else ""))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
