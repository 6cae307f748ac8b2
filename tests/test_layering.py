"""The package layers, proven from the source: every import (inside functions too) points down.

service/: core (0) < settings (1) < engine, queues, router, weights (2; peers never import each
other) < commands (3) < app, cli, __main__ (4). models/ never imports service/, training/ or
evaluation/; training/ and evaluation/ never import service/. The HTTP process in Redis mode
imports no torch.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("service", "models", "training", "evaluation")
SERVICE_LAYERS = {
    "core": 0,
    "settings": 1,
    "engine": 2,
    "queues": 2,
    "router": 2,
    "weights": 2,
    "commands": 3,
    "app": 4,
    "cli": 4,
    "__main__": 4,
    "__init__": 4,  # the package itself: its docstring and __version__
}
# Imports that break the rule, each to be removed by the merge named beside it.
KNOWN_EXCEPTIONS: set[tuple[str, str]] = set()
# The `serve` command's one job is to start the HTTP process, whose composition root is
# service.app: the one import from commands up to the entry points, and only from serve.
SERVE_STARTS_THE_APP = {("service/commands/serve.py", "service.app")}


def module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, root: Path = REPO) -> Iterator[str]:
    """Every module ``path`` imports, at the top or inside functions, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            yield module
            # `from service import app` imports the module service.app
            yield from (f"{module}.{alias.name}" for alias in node.names)


def service_layer(module: str) -> str | None:
    """The layer of a ``service`` module (``service.queues.redis.worker`` -> ``queues``)."""
    parts = module.split(".")
    if parts[0] != "service":
        return None
    if len(parts) == 1:
        return "__init__"
    return parts[1] if parts[1] in SERVICE_LAYERS else None  # a name, e.g. service.__version__


def source_files(root: Path) -> list[Path]:
    return sorted(p for package in PACKAGES for p in (root / package).rglob("*.py"))


def violations(root: Path = REPO) -> list[tuple[str, str, str]]:
    found = []
    for path in source_files(root):
        source = path.relative_to(root).as_posix()
        own_package = source.split("/")[0]
        own_layer = service_layer(module_name(path, root))
        for module in sorted(set(imported_modules(path, root))):
            top = module.split(".")[0]
            if top not in PACKAGES or (top == own_package and own_package != "service"):
                continue
            if own_package == "models" and top in ("service", "training", "evaluation"):
                found.append((source, module, "models/ imports only models/"))
            elif own_package in ("training", "evaluation") and top == "service":
                found.append((source, module, f"{own_package}/ never imports service/"))
            elif own_layer is not None and top == "service":
                target = service_layer(module)
                if target is None or target == own_layer:
                    continue
                if SERVICE_LAYERS[target] > SERVICE_LAYERS[own_layer]:
                    found.append((source, module, f"{own_layer} imports {target}, a layer above"))
                elif SERVICE_LAYERS[target] == SERVICE_LAYERS[own_layer] == 2:
                    found.append((source, module, f"{own_layer} imports its peer {target}"))
    return found


def test_the_scanner_sees_imports_inside_functions() -> None:
    imports = set(imported_modules(REPO / "service/commands/worker.py"))
    assert "service.engine.batch" in imports  # imported inside run_worker only
    assert "service.queues.redis.worker" in imports
    assert service_layer("service.queues.redis.worker") == "queues"
    assert service_layer("service.settings") == "settings"


def allowed(source: str, module: str) -> bool:
    """``module`` (or a name in it: ``service.app.create_app``) is an allowed exception."""
    return any(
        source == src and (module == mod or module.startswith(mod + "."))
        for src, mod in KNOWN_EXCEPTIONS | SERVE_STARTS_THE_APP
    )


def test_every_import_points_down() -> None:
    broken = [v for v in violations() if not allowed(v[0], v[1])]
    assert broken == [], "\n".join(f"{src}: {mod} ({why})" for src, mod, why in broken)


def test_known_exceptions_still_exist() -> None:
    """Each exception names a real import; delete it once the merge that removes it lands."""
    current = {(src, mod) for src, mod, _ in violations()}
    assert current >= (KNOWN_EXCEPTIONS | SERVE_STARTS_THE_APP)


def test_the_rule_catches_each_kind_of_breach(tmp_path: Path) -> None:
    """On a made-up tree: a peer import inside a function, core importing settings, a relative
    import up a layer, models importing service, and a downward import that is fine."""
    files = {
        "service/router/probe.py": "def f():\n    from service.engine.batch import BatchEngine\n",
        "service/core/probe.py": "import service.settings\n",
        "service/queues/probe.py": "from ..commands import worker\n",
        "models/probe.py": "from service.core.jobs import Job\n",
        "service/commands/probe.py": "from service.queues.memory import InProcessQueue\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = {(src, mod) for src, mod, _ in violations(tmp_path)}
    assert found == {
        ("service/router/probe.py", "service.engine.batch"),
        ("service/router/probe.py", "service.engine.batch.BatchEngine"),
        ("service/core/probe.py", "service.settings"),
        ("service/queues/probe.py", "service.commands"),
        ("service/queues/probe.py", "service.commands.worker"),
        ("models/probe.py", "service.core.jobs"),
        ("models/probe.py", "service.core.jobs.Job"),
    }


def test_core_imports_nothing_of_the_service_but_core() -> None:
    for path in sorted((REPO / "service/core").rglob("*.py")):
        for module in imported_modules(path):
            if module.split(".")[0] == "service":
                assert service_layer(module) == "core", f"{path.name} imports {module}"


CHECK_NO_TORCH = """
import json, sys
import service.settings
import service.app
from prometheus_client import REGISTRY
from service.app import create_app
from service.settings import ServiceSettings

create_app(ServiceSettings(queue="redis"))
names = sorted({metric.name for metric in REGISTRY.collect() if metric.name.startswith("colorize")})
print(json.dumps({"torch": sorted(m for m in sys.modules if m.split(".")[0] == "torch"),
                  "metrics": names}))
"""


@pytest.mark.timeout(120)
def test_the_redis_mode_api_process_imports_no_torch() -> None:
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", CHECK_NO_TORCH], cwd=REPO, env=env, capture_output=True,
        text=True, timeout=110, check=True,
    )  # fmt: skip
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["torch"] == []
    # and its /metrics holds the API role's metrics: requests yes, engine metrics no
    assert "colorize_requests" in report["metrics"]
    assert "colorize_batch_size" not in report["metrics"]
    assert "colorize_model_info" not in report["metrics"]
