"""docker-compose.yml: valid against the Compose Specification, and everything it points at exists.

No Docker engine runs in CI, so this is what `docker compose config` would check, and more: the schema
(the Compose Specification JSON schema vendored by the check-jsonschema package, offline), build
contexts, Dockerfiles, bind-mounted files, interpolated variables, settings, dependencies, health checks,
and the wiring between the services (Prometheus targets, Grafana provisioning, the gateway).
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from importlib import resources

import pytest
import yaml

from .helpers import (
    COMPOSE_FILE,
    DEPLOY_DOC,
    PROMETHEUS_CONFIG,
    ROOT,
    compose,
    compose_interpolate,
    dashboards,
    find_tool,
    load_yaml,
    missing,
    settings_env_names,
)


def compose_schema() -> dict:
    try:
        vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    except ModuleNotFoundError:
        missing(
            "check-jsonschema (it ships the Compose Specification schema)", "pip install check-jsonschema"
        )
    return json.loads((vendor / "compose-spec.json").read_text(encoding="utf-8"))


def schema_errors(doc: dict) -> list[str]:
    import jsonschema  # noqa: PLC0415 - a dependency of check-jsonschema

    schema = compose_schema()
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def services() -> dict:
    return compose()["services"]


def test_compose_file_matches_compose_specification_schema():
    raw = compose()
    assert schema_errors(raw) == []
    # ... and as Compose sees it after interpolation, with no .env: every default applies.
    interpolated = yaml.safe_load(compose_interpolate(COMPOSE_FILE.read_text(encoding="utf-8")))
    assert schema_errors(interpolated) == []


def test_the_schema_check_really_rejects_a_broken_file():
    bad = copy.deepcopy(compose())
    bad["services"]["api"]["healthcheck"] = {"test": ["CMD", "true"], "intervall": "5s"}
    bad["services"]["worker"]["deploy"] = {"resources": {"reservations": {"devices": "all"}}}
    errors = schema_errors(bad)
    assert any("intervall" in e for e in errors), errors
    assert any("devices" in e for e in errors), errors


def test_check_jsonschema_cli_accepts_the_file():
    exe = find_tool("check-jsonschema", "pip install check-jsonschema")
    out = subprocess.run(
        [exe, "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_build_contexts_and_dockerfiles_exist():
    built = {name: svc["build"] for name, svc in services().items() if "build" in svc}
    assert {"api", "worker", "worker-gpu"} <= set(built)
    for name, build in built.items():
        context = (COMPOSE_FILE.parent / build["context"]).resolve()
        assert context.is_dir(), f"{name}: build context {context} missing"
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
    assert built["worker-gpu"]["dockerfile"] == "docker/Dockerfile.gpu"
    assert built["api"] == built["worker"], "API and CPU worker run the same image"


def test_bind_mounted_files_exist():
    mounts = 0
    for name, svc in services().items():
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0] if isinstance(vol, str) else vol.get("source", "")
            if source.startswith((".", "/")):
                mounts += 1
                path = (COMPOSE_FILE.parent / source).resolve()
                assert path.exists(), f"{name}: bind mount source {source} does not exist"
            else:
                assert source in compose().get("volumes", {}), f"{name}: named volume {source} not declared"
    assert mounts >= 4


def test_env_files_exist():
    for name, svc in services().items():
        env_file = svc.get("env_file")
        for entry in [env_file] if isinstance(env_file, str | dict) else env_file or []:
            path = entry if isinstance(entry, str) else entry["path"]
            required = True if isinstance(entry, str) else entry.get("required", True)
            assert not required or (COMPOSE_FILE.parent / path).is_file(), f"{name}: env_file {path} missing"


def interpolated_variables() -> dict[str, str | None]:
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    out = {}
    for m in re.finditer(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?-([^}]*))?\}", text):
        out[m.group(1)] = m.group(3)
    assert not re.search(r"\$[A-Za-z_]", re.sub(r"\$\{[^}]*\}|\$\$", "", text)), "use ${VAR} form only"
    return out


def test_every_interpolated_variable_has_a_default_and_is_documented():
    doc = DEPLOY_DOC.read_text(encoding="utf-8")
    variables = interpolated_variables()
    assert variables
    for name, default in variables.items():
        assert default is not None, f"${{{name}}} has no default: `docker compose up` needs a .env"
        assert f"`{name}`" in doc, f"{name} is not documented in docs/DEPLOY.md"


def test_service_environment_names_are_settings_the_code_reads():
    known = settings_env_names()
    assert "S2AMNET_REDIS_URL" in known
    for name, svc in services().items():
        env = svc.get("environment") or {}
        keys = env if isinstance(env, dict) else [e.split("=", 1)[0] for e in env]
        for key in keys:
            if key.startswith("S2AMNET_"):
                assert key in known, f"{name}: {key} is not a setting app/ reads"


def test_app_services_run_in_redis_mode_against_the_redis_service():
    for name in ("api", "worker", "worker-gpu"):
        env = services()[name]["environment"]
        assert env["S2AMNET_REDIS_URL"] == "redis://redis:6379/0"
        assert services()[name]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_redis_persists_and_has_a_healthcheck():
    redis = services()["redis"]
    cmd = redis["command"]
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert cmd[cmd.index("--maxmemory-policy") + 1] == "noeviction"
    assert any(v.split(":")[1] == "/data" for v in redis["volumes"])
    assert "redis-cli" in redis["healthcheck"]["test"]
    assert re.match(r"redis:7", redis["image"]), "Redis 7+ reports consumer-group lag"


def test_scaled_services_have_no_fixed_host_port_or_container_name():
    for name in ("api", "worker", "worker-gpu"):
        svc = services()[name]
        assert "ports" not in svc, f"{name} is scaled: a published host port would conflict"
        assert "container_name" not in svc
    gateway = services()["gateway"]
    assert [p.split(":")[-1] for p in gateway["ports"]] == ["8080"]
    assert "./docker/nginx/nginx.conf:/etc/nginx/nginx.conf:ro" in gateway["volumes"]


def test_gpu_profile_reserves_nvidia_devices_and_cpu_worker_is_default():
    cpu, gpu = services()["worker"], services()["worker-gpu"]
    assert "profiles" not in cpu and cpu["environment"]["S2AMNET_DEVICE"] == "cpu"
    assert gpu["profiles"] == ["gpu"]
    assert gpu["environment"]["S2AMNET_DEVICE"].startswith("cuda")
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert gpu["command"] == cpu["command"] == ["worker"]


def test_dependencies_exist_and_healthy_conditions_have_healthchecks():
    for name, svc in services().items():
        for dep, spec in (svc.get("depends_on") or {}).items():
            assert dep in services(), f"{name} depends on unknown service {dep}"
            if spec.get("condition") == "service_healthy":
                target = services()[dep]
                # A service built from our Dockerfile has the image's HEALTHCHECK.
                assert "healthcheck" in target or "build" in target, f"{dep} has no healthcheck"


def test_worker_healthcheck_probes_its_metrics_port():
    for name in ("worker", "worker-gpu"):
        svc = services()[name]
        port = str(svc["environment"]["S2AMNET_METRICS_PORT"])
        assert svc["healthcheck"]["test"][-1] == f"http://127.0.0.1:{port}/metrics"
        assert svc["expose"] == [port]


def _seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|m)", value)
    assert m, value
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[m.group(2)]


def test_stop_grace_periods_cover_the_drain():
    api = services()["api"]
    env = {k: compose_interpolate(str(v)) for k, v in api["environment"].items()}
    drain = float(env["S2AMNET_DRAIN_TIMEOUT_S"]) + float(env["S2AMNET_SHUTDOWN_DELAY_S"])
    assert _seconds(api["stop_grace_period"]) > drain
    assert _seconds(services()["worker"]["stop_grace_period"]) >= 30


def test_prometheus_scrapes_the_api_and_worker_services_by_dns():
    prom = services()["prometheus"]
    assert "./docker/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom["volumes"]
    assert "./docker/prometheus/rules.yml:/etc/prometheus/rules.yml:ro" in prom["volumes"]
    config = load_yaml(PROMETHEUS_CONFIG)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    api_sd = jobs["s2amnet-api"]["dns_sd_configs"][0]
    assert (
        api_sd["names"] == ["api"]
        and api_sd["type"] == "A"
        and str(api_sd["port"]) in services()["api"]["expose"]
    )
    worker_sd = jobs["s2amnet-worker"]["dns_sd_configs"][0]
    assert set(worker_sd["names"]) == {"worker", "worker-gpu"}
    for name in worker_sd["names"]:
        assert str(worker_sd["port"]) in services()[name]["expose"]


def test_grafana_provisioning_matches_mounts_and_dashboard():
    grafana = services()["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"] if v.startswith(".")}
    provisioning = ROOT / mounts["/etc/grafana/provisioning"]
    datasources = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert datasources[0]["url"] == "http://prometheus:9090" and datasources[0]["type"] == "prometheus"
    providers = load_yaml(provisioning / "dashboards" / "s2amnet.yml")["providers"]
    assert providers[0]["options"]["path"] in mounts
    assert ROOT / mounts[providers[0]["options"]["path"]] == ROOT / "docker/grafana/dashboards"
    uids = {d["uid"] for d in datasources}
    for _, dashboard in dashboards():
        for panel in dashboard["panels"]:
            if "datasource" in panel:
                assert panel["datasource"]["uid"] in uids
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    mount_point = providers[0]["options"]["path"]
    assert home.startswith(mount_point + "/")
    assert (ROOT / mounts[mount_point] / home[len(mount_point) + 1 :]).is_file()
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


NGINX_CONF = ROOT / "docker" / "nginx" / "nginx.conf"


def test_gateway_config_fits_the_service_limits():
    text = NGINX_CONF.read_text(encoding="utf-8")
    env = {k: compose_interpolate(str(v)) for k, v in services()["api"]["environment"].items()}
    body = int(re.search(r"client_max_body_size\s+(\d+)m;", text).group(1))
    assert body > float(env["S2AMNET_MAX_BODY_MB"]), "the API, not nginx, must answer 413"
    read_timeout = int(re.search(r"proxy_read_timeout\s+(\d+)s;", text).group(1))
    assert read_timeout > float(env["S2AMNET_REQUEST_TIMEOUT_S"]), "the API, not nginx, must answer 504"
    assert "resolver 127.0.0.11" in text and "set $api_upstream http://api:8000;" in text
    assert re.search(r"listen\s+8080;", text)


def test_gateway_config_passes_nginx_t(tmp_path):
    nginx = find_tool("nginx", "apt-get install nginx-light")
    # nginx -t also opens the pid and temp paths; the config keeps them under /tmp.
    out = subprocess.run(
        [nginx, "-t", "-q", "-p", str(tmp_path), "-c", str(NGINX_CONF)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("section", ["Deploy", "Scale out"])
def test_deploy_doc_has_the_sections(section):
    text = DEPLOY_DOC.read_text(encoding="utf-8")
    assert re.search(rf"^## {section}\b", text, re.M), f"docs/DEPLOY.md lacks '## {section}'"
