"""app.settings: environment, flags, per-model caps, defaults, and the device rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.settings import Settings, settings_from_args

ROOT = Path(__file__).resolve().parents[2]


def test_settings_env_csv_and_cli_override(monkeypatch):
    monkeypatch.setenv("S2AMNET_MODELS", "a, b,,c")
    monkeypatch.setenv("S2AMNET_API_KEYS", "k1,k2")
    monkeypatch.setenv("S2AMNET_MAX_BATCH_SIZE", "32")
    monkeypatch.setenv("S2AMNET_PORT", "9000")
    s = Settings()
    assert s.models == ["a", "b", "c"] and s.api_keys == ["k1", "k2"] and s.max_batch_size == 32
    assert s.max_body_bytes == 20 * 1024 * 1024 and s.max_pixels == 40_000_000 and s.max_images == 16

    class Args:
        port = 8123
        models = "x"
        max_batch_size = None

    s = settings_from_args(Args())
    assert (s.port, s.models, s.max_batch_size) == (8123, ["x"], 32)  # flag > env > default
    monkeypatch.setenv("S2AMNET_MAX_QUEUE", "0")
    with pytest.raises(ValueError):
        Settings()


def test_settings_per_model_batch_caps(monkeypatch):
    monkeypatch.setenv("S2AMNET_MODEL_MAX_BATCH_SIZE", "crack-segment=1, mt-segment = 4")
    s = Settings(max_batch_size=8)
    assert s.model_max_batch_size == {"crack-segment": 1, "mt-segment": 4}
    assert s.batch_sizes(["crack-segment", "mt-segment", "neu-det-detect"]) == {
        "crack-segment": 1, "mt-segment": 4, "neu-det-detect": 8}
    assert Settings(max_batch_size=2).batch_sizes(["mt-segment"], strict=False) == {"mt-segment": 2}  # never above
    with pytest.raises(RuntimeError, match="crack-segment"):
        s.batch_sizes(["mt-segment"])
    for bad in ("crack-segment", "crack-segment=0", "=3", "a=x"):
        monkeypatch.setenv("S2AMNET_MODEL_MAX_BATCH_SIZE", bad)
        with pytest.raises(ValueError):
            Settings()
    monkeypatch.delenv("S2AMNET_MODEL_MAX_BATCH_SIZE")
    assert Settings().model_max_batch_size == {}


def test_settings_defaults_match_the_design():
    s = Settings(_env_file=None)
    assert (
        s.host,
        s.port,
        str(s.weights_dir),
        s.models,
        s.max_batch_size,
        s.max_delay_ms,
        s.max_queue,
        s.request_timeout_s,
        s.redis_url,
        s.api_keys,
        s.max_body_mb,
        s.max_pixels,
        s.max_images,
        s.metrics_port,
    ) == ("0.0.0.0", 8000, "weights", [], 16, 5.0, 256, 10.0, None, [], 20.0, 40_000_000, 16, 9100)


def test_device_auto_is_cuda_only_when_torch_sees_a_gpu(monkeypatch):
    import torch

    from model.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device(None) == Settings().resolved_device() == "cpu"
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(RuntimeError, match="torch sees no CUDA GPU"):
        Settings(device="cuda:0").resolved_device()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert Settings().resolved_device() == "cuda" and Settings(device="cuda:1").resolved_device() == "cuda:1"


def test_serve_and_worker_flags_come_from_the_settings():
    """Each flag of `s2amnet serve` / `s2amnet worker` is a Settings field: its help is the field's
    description, its value is parsed like the environment's."""
    from app.cli import build_parser
    from app.settings import SERVE_FLAGS, WORKER_FLAGS

    parser = build_parser()
    args = parser.parse_args(["serve", "--port", "8123", "--max-delay-ms", "2.5", "--models", "a,b",
                              "--forward-batch", "auto", "--model-max-batch-size", "a=2", "--torch-threads", "2",
                              "--cpu-streams", "3"])
    s = settings_from_args(args, SERVE_FLAGS)
    assert (s.port, s.max_delay_ms, s.models, s.forward_batch, s.model_max_batch_size, s.torch_threads,
            s.cpu_streams) == (8123, 2.5, ["a", "b"], "auto", {"a": 2}, 2, 3)
    args = parser.parse_args(["worker", "--visibility-timeout", "4", "--max-deliveries", "5", "--name", "w1"])
    s = settings_from_args(args, WORKER_FLAGS)
    assert (s.visibility_timeout_s, s.max_deliveries, args.name) == (4.0, 5, "w1")
    sub = next(a for a in parser._actions if a.dest == "command").choices
    for command, names in (("serve", SERVE_FLAGS), ("worker", WORKER_FLAGS)):
        helps = {a.dest: a.help for a in sub[command]._actions}
        for name in names:
            assert helps[name].startswith(Settings.model_fields[name].description.replace("%", "%%")), name


def test_the_settings_offer_exactly_the_backends_there_are():
    from typing import get_args

    from app.settings import BackendName
    from model.backends import BACKENDS

    assert set(get_args(BackendName)) == {"auto", *BACKENDS}
    assert Settings(backend="openvino-bf16", model_backend="a=compile,b=auto").model_backend == {"a": "compile",
                                                                                                "b": "auto"}


def test_an_unset_or_empty_backend_leaves_the_choice_to_the_device(monkeypatch):
    """S2AMNET_BACKEND unset or empty (`S2AMNET_BACKEND=` in an env file): None, which the runtime reads as the
    device's default (`app.runtime.default_backend`: channels-last eager on a CPU, eager on a GPU)."""
    from app.runtime import default_backend

    monkeypatch.delenv("S2AMNET_BACKEND", raising=False)
    assert Settings().backend is None
    monkeypatch.setenv("S2AMNET_BACKEND", " ")
    assert Settings().backend is None
    monkeypatch.setenv("S2AMNET_BACKEND", "eager")
    assert Settings().backend == "eager"
    assert default_backend("cpu") == "eager-channels-last" and default_backend("cuda") == "eager"


def test_an_empty_variable_counts_as_unset(monkeypatch):
    """`S2AMNET_X=` (an env file, or `${X:-}` in compose) gives the field its default, never an empty path, URL
    or number: an empty S2AMNET_RECORDS_DIR is not the current folder, an empty S2AMNET_RECIPES not a recipe
    file named "."."""
    fields = ("records_dir", "records_url", "recipes", "device", "max_batch_size", "redis_url", "models", "api_keys",
              "mqtt_url", "request_timeout_s")
    for name in fields:
        monkeypatch.delenv(f"S2AMNET_{name.upper()}", raising=False)
    defaults = Settings()
    for name in fields:
        monkeypatch.setenv(f"S2AMNET_{name.upper()}", "")
    empty = Settings()
    assert {n: getattr(empty, n) for n in fields} == {n: getattr(defaults, n) for n in fields}
    assert empty.records_dir == Path("records") and empty.recipes is None and empty.redis_url is None
    monkeypatch.setenv("S2AMNET_RECORDS_DIR", "/var/lib/s2amnet/records")
    assert Settings().records_dir == Path("/var/lib/s2amnet/records")


def test_cpu_streams_take_auto_or_a_whole_number(monkeypatch):
    from pydantic import ValidationError

    assert Settings().cpu_streams == "auto"
    monkeypatch.setenv("S2AMNET_CPU_STREAMS", " AUTO ")
    assert Settings().cpu_streams == "auto"
    monkeypatch.setenv("S2AMNET_CPU_STREAMS", "1")
    assert Settings().cpu_streams == 1
    for bad in ("0", "two", "1.5"):
        monkeypatch.setenv("S2AMNET_CPU_STREAMS", bad)
        with pytest.raises(ValidationError, match="auto or a whole number"):
            Settings()


def test_log_level_and_redis_url_are_checked_when_read(monkeypatch):
    """A typo fails at start with the setting named (`s2amnet serve|worker` print it in one line), not
    with a traceback from logging or from the first Redis call."""
    from pydantic import ValidationError

    monkeypatch.setenv("S2AMNET_LOG_LEVEL", " WARNING ")
    assert Settings().log_level == "warning"
    monkeypatch.setenv("S2AMNET_LOG_LEVEL", "loud")
    with pytest.raises(ValidationError, match="expected one of debug, info, warning, error, critical"):
        Settings()
    monkeypatch.delenv("S2AMNET_LOG_LEVEL")
    for good in ("redis://localhost:6379/0", "rediss://:secret@redis.plant:6380/1", "unix:///run/redis.sock"):
        monkeypatch.setenv("S2AMNET_REDIS_URL", good)
        assert Settings().redis_url == good
    for bad in ("notaurl", "localhost:6379", "http://redis:6379", "redis://"):
        monkeypatch.setenv("S2AMNET_REDIS_URL", bad)
        with pytest.raises(ValidationError, match="expected redis://host:port/db"):
            Settings()


def test_serve_and_worker_answer_bad_settings_in_one_line(capsys):
    from app.cli import main

    for argv, said in ((["serve", "--log-level", "loud"], "error: invalid setting: log_level"),
                       (["worker", "--redis-url", "notaurl"], "error: invalid setting: redis_url")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err, err
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--workers", "0"])
    assert exited.value.code == 2 and "argument --workers: must be >= 1, got 0" in capsys.readouterr().err
