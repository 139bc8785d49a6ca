"""app.runtime: allocator tuning and torch threads of the process that runs the forwards."""

from __future__ import annotations

from pathlib import Path

from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_allocator_tuning_applies_on_glibc_and_yields_to_the_environment(monkeypatch):
    import platform

    from app import runtime

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    assert runtime.tune_allocator() is (platform.libc_ver()[0] == "glibc")  # mallopt accepted both values
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")  # the operator's own setting wins
    assert runtime.tune_allocator() is False


def test_configure_runtime_follows_the_settings(monkeypatch):
    from app import runtime

    calls = []
    monkeypatch.setattr(runtime, "tune_allocator", lambda: calls.append("tuned") or True)
    monkeypatch.setattr(runtime, "configure_torch_threads", lambda n: calls.append(("threads", n)))
    runtime.configure_runtime(Settings(torch_threads=3))
    runtime.configure_runtime(Settings(allocator_tuning=False))
    assert calls == [("threads", 3), "tuned", ("threads", None)]
