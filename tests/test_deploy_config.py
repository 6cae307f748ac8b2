"""The deployment files, checked without a Docker engine.

- docker-compose*.yml through a real Docker Compose v2 (`config`: the compose-spec schema,
  interpolation, `extends`, `!reset`), then the resolved model's wiring;
- the Prometheus config through `promtool check config`, and every dashboard expression through
  `promtool check rules` (PromQL syntax);
- the dashboard against a live /metrics page of the real app: every metric it names is exported;
- the Dockerfile, .dockerignore, the image's dependency files and the entrypoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_support import (
    DASHBOARD,
    PROMETHEUS_CONFIG,
    REPO,
    compose_command,
    dashboard_queries,
    evaluable,
    exposed_series_names,
    free_port,
    iter_panels,
    load_dashboard,
    metric_names,
    require_binary,
)

GPU_COMPOSE = REPO / "docker-compose.yml"
CPU_COMPOSE = REPO / "docker-compose.cpu.yml"
DATASOURCES = REPO / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = REPO / "deploy" / "grafana" / "provisioning" / "dashboards" / "instcolor.yml"
ENTRYPOINT = REPO / "deploy" / "entrypoint.sh"


def _clean_env() -> dict[str, str]:
    """The environment without deployment overrides, so the files' defaults are what is tested."""
    prefixes = ("COLORIZE_", "INSTCOLOR_", "GRAFANA_", "PROMETHEUS_", "MONITORING_", "COMPOSE_")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


def compose_config(file: Path) -> dict[str, Any]:
    """The compose model as Docker Compose resolves it (fails the test on any spec violation)."""
    result = subprocess.run(
        [*compose_command(), "-f", str(file), "config", "--format", "json"],
        cwd=REPO, env=_clean_env(), capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, f"docker compose config {file.name}:\n{result.stderr}"
    config: dict[str, Any] = json.loads(result.stdout)
    return config


@pytest.fixture(scope="module")
def gpu_stack() -> dict[str, Any]:
    return compose_config(GPU_COMPOSE)


@pytest.fixture(scope="module")
def cpu_stack() -> dict[str, Any]:
    return compose_config(CPU_COMPOSE)


@pytest.fixture(scope="module")
def prometheus_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    return config


def scrape_job(prometheus_config: dict[str, Any], name: str) -> dict[str, Any]:
    jobs = {job["job_name"]: job for job in prometheus_config["scrape_configs"]}
    job: dict[str, Any] = jobs[name]
    return job


def bind_targets(service: dict[str, Any]) -> dict[str, str]:
    """Mount target -> source path relative to the repository."""
    return {
        v["target"]: str(Path(v["source"]).resolve().relative_to(REPO))
        for v in service.get("volumes", [])
        if v["type"] == "bind"
    }


# --- docker-compose.yml ------------------------------------------------------------------------


def test_compose_gpu_stack_services(gpu_stack: dict[str, Any]) -> None:
    assert set(gpu_stack["services"]) == {"redis", "api", "worker", "prometheus", "grafana"}


def test_compose_redis_is_healthchecked_and_gates_api_and_worker(gpu_stack: dict[str, Any]) -> None:
    services = gpu_stack["services"]
    assert services["redis"]["healthcheck"]["test"][:2] == ["CMD", "redis-cli"]
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy", name
        assert services[name]["environment"]["COLORIZE_REDIS_URL"].startswith("redis://redis:")


def test_compose_api_runs_in_redis_mode(gpu_stack: dict[str, Any]) -> None:
    api = gpu_stack["services"]["api"]
    assert api["command"] == ["serve"]
    assert api["environment"]["COLORIZE_QUEUE"] == "redis"
    assert api["environment"]["COLORIZE_FETCH_WEIGHTS"] == "never"
    assert [p["target"] for p in api["ports"]] == [8000]


def test_compose_worker_reserves_a_gpu_and_can_scale(gpu_stack: dict[str, Any]) -> None:
    worker = gpu_stack["services"]["worker"]
    assert worker["command"] == ["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert device["capabilities"] == ["gpu"]
    assert device["count"] == 1
    # `--scale worker=N` needs replicas without a fixed name or a published host port.
    assert "container_name" not in worker
    assert "ports" not in worker


def test_compose_service_containers_share_the_weights_volume(gpu_stack: dict[str, Any]) -> None:
    for name in ("api", "worker"):
        service = gpu_stack["services"][name]
        mounts = {v["target"]: v for v in service["volumes"]}
        assert mounts["/weights"]["type"] == "volume"
        assert mounts["/weights"]["source"] == "weights"
        assert service["init"] is True
        assert service["image"] == "instcolor-service:latest"
    assert "weights" in gpu_stack["volumes"]


def test_prometheus_finds_every_api_and_worker_replica(
    gpu_stack: dict[str, Any], prometheus_config: dict[str, Any]
) -> None:
    """DNS service discovery on the compose service names, on the ports the services listen on."""
    worker_port = int(
        gpu_stack["services"]["worker"]["environment"]["COLORIZE_WORKER_METRICS_PORT"]
    )
    expected = {"colorize-api": ("api", 8000), "colorize-worker": ("worker", worker_port)}
    for job_name, (service, port) in expected.items():
        (sd,) = scrape_job(prometheus_config, job_name)["dns_sd_configs"]
        assert sd["names"] == [service]
        assert sd["type"] == "A"
        assert sd["port"] == port
        assert service in gpu_stack["services"]
    assert str(worker_port) in gpu_stack["services"]["worker"]["expose"]
    assert gpu_stack["services"]["worker"]["environment"]["COLORIZE_HEALTHCHECK_URL"] == (
        f"http://127.0.0.1:{worker_port}/metrics"
    )


def test_prometheus_and_grafana_are_provisioned_from_the_repo(gpu_stack: dict[str, Any]) -> None:
    services = gpu_stack["services"]
    assert bind_targets(services["prometheus"]) == {
        "/etc/prometheus/prometheus.yml": "deploy/prometheus/prometheus.yml"
    }
    grafana_mounts = bind_targets(services["grafana"])
    assert grafana_mounts == {
        "/etc/grafana/provisioning": "deploy/grafana/provisioning",
        "/var/lib/grafana/dashboards": "deploy/grafana/dashboards",
    }
    # The provider loads the mounted folder; the home dashboard is the file in it.
    providers = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    assert [p["options"]["path"] for p in providers] == ["/var/lib/grafana/dashboards"]
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"/var/lib/grafana/dashboards/{DASHBOARD.name}"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    # Monitoring UIs are published on loopback only unless the operator opts in.
    for name in ("prometheus", "grafana"):
        assert [p["host_ip"] for p in services[name]["ports"]] == ["127.0.0.1"], name


def test_grafana_datasource_is_the_one_the_dashboard_uses(gpu_stack: dict[str, Any]) -> None:
    (datasource,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert "prometheus" in gpu_stack["services"]
    assert [p["target"] for p in gpu_stack["services"]["prometheus"]["ports"]] == [9090]
    panels = [p for p in iter_panels(load_dashboard()) if p["type"] != "row"]
    for panel in panels:
        sources = [panel["datasource"], *(t["datasource"] for t in panel["targets"])]
        for source in sources:
            assert source == {"type": "prometheus", "uid": datasource["uid"]}, panel["title"]


# --- docker-compose.cpu.yml --------------------------------------------------------------------


def test_compose_cpu_stack_is_one_process_without_redis_or_gpu(cpu_stack: dict[str, Any]) -> None:
    assert set(cpu_stack["services"]) == {"api", "prometheus", "grafana"}
    api = cpu_stack["services"]["api"]
    assert api["command"] == ["serve"]
    env = api["environment"]
    assert (env["COLORIZE_QUEUE"], env["COLORIZE_DEVICE"], env["COLORIZE_PRECISION"]) == (
        "memory", "cpu", "fp32",
    )  # fmt: skip
    assert env["COLORIZE_FETCH_WEIGHTS"] == "auto"
    assert "depends_on" not in api
    assert "deploy" not in api
    assert api["build"]["args"]["BASE_IMAGE"] == "python:3.11-slim"
    assert api["image"] != "instcolor-service:latest"  # never overwrites the CUDA image's tag
    # The same Prometheus config scrapes it: the single process is the `api` service.
    assert bind_targets(cpu_stack["services"]["prometheus"]) == {
        "/etc/prometheus/prometheus.yml": "deploy/prometheus/prometheus.yml"
    }


# --- Prometheus config and the dashboard's PromQL ------------------------------------------------


def test_promtool_check_config() -> None:
    promtool = require_binary("promtool")
    result = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_CONFIG)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_every_dashboard_expression_parses(tmp_path: Path) -> None:
    """promtool parses each panel query as a recording rule: a PromQL syntax error fails here."""
    promtool = require_binary("promtool")
    queries = dashboard_queries()
    rules = {
        "groups": [{
            "name": "dashboard",
            "rules": [{"record": f"dashboard:panel_{i}", "expr": evaluable(q.expr)}
                      for i, q in enumerate(queries)],
        }]
    }  # fmt: skip
    rules_file = tmp_path / "dashboard_rules.yml"
    rules_file.write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [promtool, "check", "rules", str(rules_file)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


def test_metric_name_extraction() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le, stage) (rate(colorize_stage_duration_seconds_bucket"
        '{stage!="total", job=~"a.*"}[$__rate_interval]))) / on (instance) group_left (device) '
        "colorize_model_info offset 5m > bool 1e3"
    )
    assert metric_names(expr) == {"colorize_stage_duration_seconds_bucket", "colorize_model_info"}
    assert metric_names('{__name__="colorize_queue_depth"}') == {"colorize_queue_depth"}


def test_dashboard_covers_the_issue_and_every_service_metric() -> None:
    dashboard = load_dashboard()
    panels = [p for p in iter_panels(dashboard) if p["type"] != "row"]
    ids = [p["id"] for p in iter_panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["targets"], panel["title"]
        assert panel.get("description"), f"{panel['title']}: say what the panel means"
    named = set().union(*(metric_names(q.expr) for q in dashboard_queries(dashboard)))
    families = {re.sub(r"_(bucket|sum|count)$", "", name) for name in named}
    from service.core.metrics import (
        METRICS,  # the contract: every colorize_* family is on the board
    )

    collectors = [value for value in vars(METRICS).values() if hasattr(value, "collect")]
    contract = {
        family.name + ("_total" if family.type == "counter" else "")
        for collector in collectors
        for family in collector.collect()
    }
    assert len(contract) == 22
    assert contract <= families, f"not on the dashboard: {sorted(contract - families)}"
    titles = " | ".join(p["title"] for p in panels).lower()
    for topic in ("request rate", "error", "p50", "p95", "p99", "queue", "dropped", "batch size",
                  "instances per image", "gpu memory", "cache hit", "model processes"):  # fmt: skip
        assert topic in titles, topic


# --- Dockerfile, .dockerignore, entrypoint -------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)
    instructions = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile_layers_users_and_health() -> None:
    instructions = dockerfile_instructions()
    keywords = [k for k, _ in instructions]
    args = {rest.split("=", 1)[0]: rest.split("=", 1)[1] for k, rest in instructions if k == "ARG"}
    base = args["BASE_IMAGE"]
    assert base.startswith("pytorch/pytorch:")
    assert "cuda" in base
    assert base.endswith("-runtime")

    def index(predicate: Any) -> int:
        return next(i for i, ins in enumerate(instructions) if predicate(*ins))

    deps = index(lambda k, r: k == "RUN" and "pip install -r" in r and "-c " in r)
    source = index(lambda k, r: k == "COPY" and re.search(r"\bservice\b", r))
    assert deps < source, "dependencies must be installed in a layer before the source is copied"
    copies_before_deps = [r for k, r in instructions[:deps] if k == "COPY"]
    assert copies_before_deps == ["pyproject.toml deploy/requirements_from_pyproject.py /tmp/deps/"]

    users = [r for k, r in instructions if k == "USER"]
    assert users == ["app"]
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    assert "--uid 10001" in next(r for k, r in instructions if k == "RUN" and "useradd" in r)
    healthcheck = next(r for k, r in instructions if k == "HEALTHCHECK")
    assert "instcolor-healthcheck" in healthcheck
    assert ("VOLUME", '["/weights"]') in instructions


def test_dockerfile_weight_paths_match_the_settings_defaults() -> None:
    from models.detector import DETECTOR_WEIGHTS
    from service.settings import ModelSettings

    env: dict[str, str] = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "ENV":
            env.update(re.findall(r"(\w+)=(\S+)", rest))
    defaults = ModelSettings.model_fields
    # The image keeps the settings' layout (weights/checkpoints, weights/<detector file>), under
    # /weights, which is what `fetch-weights --dir /weights` writes.
    assert env["COLORIZE_WEIGHTS_DIR"] == "/weights"
    assert env["COLORIZE_CHECKPOINTS"] == "/weights/" + defaults["checkpoints"].default.name
    assert env["COLORIZE_DETECTOR_WEIGHTS"] == "/weights/" + DETECTOR_WEIGHTS["v1"].filename
    assert env["COLORIZE_PORT"] == "8000"


def test_dockerignore_admits_exactly_what_the_dockerfile_copies() -> None:
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "start from nothing, then admit what the image needs"
    admitted = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    for pattern in ("**/*.pth", "**/__pycache__"):
        assert pattern in lines
    for keyword, rest in dockerfile_instructions():
        if keyword != "COPY":
            continue
        sources = [part for part in rest.split() if not part.startswith("--")][:-1]
        for source in sources:
            assert (REPO / source).exists(), source
            assert source.rstrip("/") in admitted, f"{source} is excluded by .dockerignore"


def test_image_requirements_keep_the_base_images_torch(tmp_path: Path) -> None:
    import tomllib

    subprocess.run(
        [sys.executable, str(REPO / "deploy" / "requirements_from_pyproject.py"),
         str(REPO / "pyproject.toml"), "--out", str(tmp_path)],
        check=True, timeout=60,
    )  # fmt: skip
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = (tmp_path / "requirements.txt").read_text().split("\n")
    assert [r for r in requirements if r] == project["dependencies"]
    constraints = (tmp_path / "constraints.txt").read_text().split()
    assert constraints == [
        f"torch=={metadata.version('torch')}",
        f"torchvision=={metadata.version('torchvision')}",
    ]


def test_image_requirements_refuse_a_base_without_torch(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "deploy" / "requirements_from_pyproject.py"),
         str(REPO / "pyproject.toml"), "--out", str(tmp_path), "--provided", "no-such-package"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "does not provide no-such-package" in result.stderr


def run_entrypoint(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The entrypoint with this interpreter first on PATH (the image's `python`)."""
    environment = _clean_env()
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment['PATH']}"
    environment.update(env)
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *args], cwd=REPO, env=environment,
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip


def test_entrypoint_is_valid_posix_sh() -> None:
    subprocess.run(["sh", "-n", str(ENTRYPOINT)], check=True, timeout=30)
    shellcheck = shutil.which("shellcheck")
    if shellcheck is not None:  # extra lint where available; `sh -n` above is the requirement
        subprocess.run([shellcheck, "--shell=sh", str(ENTRYPOINT)], check=True, timeout=30)


def test_entrypoint_runs_other_commands_as_given() -> None:
    result = run_entrypoint("python", "-c", "print('as given')")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "as given"


def test_entrypoint_refuses_an_unknown_fetch_mode() -> None:
    result = run_entrypoint("serve", COLORIZE_FETCH_WEIGHTS="sometimes")
    assert result.returncode == 2
    assert "COLORIZE_FETCH_WEIGHTS must be auto or never" in result.stderr


# --- the dashboard against a live /metrics page ---------------------------------------------------


def test_dashboard_metrics_are_exported_by_the_live_app(tiny_checkpoints: Path) -> None:
    """Every metric a panel names is on the real app's /metrics (after one real request)."""
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from service.app import create_app
    from service.settings import ServiceSettings

    settings = ServiceSettings(
        checkpoints=tiny_checkpoints, detector=False, device="cpu", warmup=False
    )
    image = io.BytesIO()
    Image.linear_gradient("L").resize((64, 48)).save(image, format="PNG")
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:  # the model loads in the background
            assert time.monotonic() < deadline, "the app did not become ready"
            time.sleep(0.1)
        response = client.post(
            "/colorize", content=image.getvalue(), headers={"content-type": "image/png"}
        )
        assert response.status_code == 200, response.text
        scrape = client.get("/metrics")
    assert scrape.status_code == 200
    exported = exposed_series_names(scrape.text)
    assert "colorize_stage_duration_seconds_bucket" in exported
    for query in dashboard_queries():
        missing = metric_names(query.expr) - exported
        assert not missing, f"panel {query.panel!r} ({query.ref}) names unexported {missing}"


def test_entrypoint_execs_the_service_command_when_weights_are_present(
    tiny_checkpoints: Path,
) -> None:
    """auto mode with complete weights downloads nothing and runs `python -m service <command>`."""
    result = run_entrypoint(
        "serve", "--help",
        COLORIZE_FETCH_WEIGHTS="auto", COLORIZE_CHECKPOINTS=str(tiny_checkpoints),
        COLORIZE_DETECTOR="false", COLORIZE_WEIGHTS_DIR=str(tiny_checkpoints),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
    assert "serve" in result.stdout
    assert "fetching" not in result.stderr
    assert "missing weight file" not in result.stderr


def test_entrypoint_reports_missing_weights_before_fetching(tmp_path: Path) -> None:
    """never mode: nothing is fetched; the missing files are left for the service to report."""
    result = run_entrypoint(
        "serve", COLORIZE_FETCH_WEIGHTS="never", COLORIZE_CHECKPOINTS=str(tmp_path / "none"),
        COLORIZE_DETECTOR="false", COLORIZE_PORT=str(free_port()),
    )  # fmt: skip
    assert result.returncode == 2
    assert "fetching" not in result.stderr
    assert "fetch-weights" in result.stderr  # the service's own message says how to get them


@pytest.mark.slow
def test_entrypoint_fetches_missing_weights_once_for_concurrent_replicas(
    tiny_checkpoints: Path, tmp_path: Path
) -> None:
    """auto mode on an empty volume: two replicas start together, one downloads (from a loopback
    mirror through COLORIZE_WEIGHTS_BASE_URL), the other waits on the lock and finds the files."""
    import threading
    import zipfile
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    with zipfile.ZipFile(mirror / "checkpoints.zip", "w") as archive:
        for file in sorted(tiny_checkpoints.glob("latest_net_*.pth")):
            archive.write(file, f"checkpoints/coco_finetuned_mask_256_ffs/{file.name}")
    requests: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            requests.append(self.path)

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(mirror)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    volume = tmp_path / "weights"
    volume.mkdir()
    env = {
        "COLORIZE_FETCH_WEIGHTS": "auto",
        "COLORIZE_WEIGHTS_DIR": str(volume),
        "COLORIZE_CHECKPOINTS": str(volume / "checkpoints"),
        "COLORIZE_DETECTOR": "false",
        "COLORIZE_WEIGHTS_BASE_URL": f"http://127.0.0.1:{server.server_address[1]}",
    }
    try:
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda _: run_entrypoint("worker", "--help", **env), range(2)))
    finally:
        server.shutdown()
        server.server_close()
    for result in results:
        assert result.returncode == 0, result.stderr
        assert "usage:" in result.stdout
    fetched = [r for r in results if "fetching weights" in r.stderr]
    assert len(fetched) == 1, [r.stderr for r in results]
    assert "(detector: none)" in fetched[0].stderr
    assert [p for p in requests if "checkpoints.zip" in p] == ["/checkpoints.zip"]
    from service.settings import ModelSettings

    assert (
        ModelSettings(checkpoints=volume / "checkpoints", detector=False).missing_weight_files()
        == []
    )
