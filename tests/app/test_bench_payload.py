"""`s2amnet bench --payload` at a tiny scale: its own redis-server, real producer and consumer processes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from support.harness import require_redis_server
from support.images import jpeg, png

from app.commands import bench_payload
from app.commands.bench_payload import PayloadBenchError, add_arguments, payload_markdown


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", nargs="+")
    parser.add_argument("--json", action="store_true")
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_the_images_option_is_shared_with_the_peers_part():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", help="defined by the peers part first")
    add_arguments(parser)  # does not define it twice
    args = parser.parse_args(["--payload", "--images", "x", "--payload-seconds", "0.5"])
    assert args.payload and args.images == "x" and args.payload_seconds == 0.5


def test_bad_options_and_folders_are_refused(tmp_path: Path):
    with pytest.raises(PayloadBenchError, match="no JPEG"):
        bench_payload.load_uploads(str(tmp_path))
    with pytest.raises(PayloadBenchError, match=">= 1"):
        bench_payload.bench_payload(parse("--payload-consumers", "0"))


def test_bytes_per_job_and_the_redis_ceiling_of_both_payloads(tmp_path: Path, weights_dir: Path):
    require_redis_server()
    images = tmp_path / "images"
    (images / "a").mkdir(parents=True)
    for i in range(3):  # small JPEGs: smaller than the array at 64x64 (12288 bytes)
        (images / "a" / f"{i}.jpg").write_bytes(jpeg(60 + 10 * i, 50, seed=i))
    (images / "a" / "skipped.png").write_bytes(png(40, 40))
    args = parse("--payload", "--weights", str(weights_dir / "det"), str(weights_dir / "cls"), "--images",
                 str(images), "--payload-seconds", "0.3", "--payload-jobs", "2", "--payload-consumers", "1")
    result = bench_payload.bench_payload(args)

    assert result["uploads"]["count"] == 3 and "3 JPEGs" in result["uploads"]["source"]
    assert [r["model"] for r in result["sizes"]] == ["det", "cls"]
    for row in result["sizes"]:
        assert row["input_size"] == [64, 64] and row["image_share"] == 1.0
        assert 3 * 64 * 64 < row["array_bytes"] < 3 * 64 * 64 + 1000
        assert row["encoded_bytes"] < row["array_bytes"] and row["ratio"] > 1
        assert row["redis_encoded_bytes"] < row["redis_array_bytes"] and row["decode_ms"] > 0
    assert [(c["input_size"], c["payload"]) for c in result["ceiling"]] == [([64, 64], "array"),
                                                                             ([64, 64], "encoded")]
    for c in result["ceiling"]:  # one input size for both models: one round per payload
        assert c["jobs"] > 0 and c["jobs_per_s"] > 0 and c["mb_per_s"] > 0 and 0 < c["redis_cpu"] <= 1.5
    assert result["machine"]["cores"] >= 1 and result["machine"]["redis"]

    md = payload_markdown({**result, "command": "s2amnet bench --payload"})
    assert md[0] == "## Bytes through Redis"
    assert sum(line.startswith("| det |") or line.startswith("| cls |") for line in md) == 2
    assert any(line.startswith("| 64×64 | encoded |") for line in md)
    assert any("same run: 64×64" in line for line in md)


def test_run_prints_the_section_and_a_json_line(weights_dir: Path, capsys):
    require_redis_server()
    args = parse("--payload", "--json", "--weights", str(weights_dir / "cls"), "--payload-seconds", "0.2",
                 "--payload-jobs", "1", "--payload-consumers", "1", "--payload-synthetic", "2")
    assert bench_payload.run_payload(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert "## Bytes through Redis" in out and "2 synthetic JPEGs" in result["uploads"]["source"]
    row = result["sizes"][0]  # the synthetic JPEGs (256-640 px) are larger than a 64x64 array: sent as arrays
    assert row["image_share"] == 0.0 and len(result["ceiling"]) == 2
    assert abs(row["encoded_bytes"] - row["array_bytes"]) <= 8  # the same fields, up to the digits of ttl_ms
