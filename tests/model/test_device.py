"""model.device: the device rule and what this machine's CPU is."""

from __future__ import annotations

from pathlib import Path

import pytest

from model import backends
from model.device import cpu_info, missing_gpu, resolve_device

CPUINFO = Path("/proc/cpuinfo")


@pytest.mark.skipif(not CPUINFO.is_file() or "\nflags" not in CPUINFO.read_text(),
                    reason="no x86 /proc/cpuinfo on this system")
def test_cpu_info_is_the_first_processors_name_and_flags():
    lines = CPUINFO.read_text().splitlines()
    name, flags = cpu_info()
    assert name == next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    assert flags == set(next(line.split(":", 1)[1].split() for line in lines if line.startswith("flags")))
    assert "fpu" in flags  # every x86-64 CPU lists it
    assert backends.cpu_has_bf16_units() == bool({"avx512_bf16", "amx_bf16"} & flags)


def test_device_rule():
    assert resolve_device("cpu") == "cpu" and resolve_device("cuda:1") == "cuda:1"
    assert resolve_device(None) == resolve_device("auto") in ("cpu", "cuda")
    assert not missing_gpu("cpu")
