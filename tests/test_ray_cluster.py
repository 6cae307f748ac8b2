"""``colorize --engine ray --ray-address``: the command as a driver of a running Ray cluster.

A real one-node cluster (``ray start --head --block`` in its own process group, on a free port,
in its own temp dir; stopped by SIGTERM to that process, never ``ray stop``, which would stop
every Ray of the machine's user), reading a ``file://`` URI source; the outputs byte-identical
to the local engine's. Its own module: ``tests/test_ray_engine.py`` runs Ray inside pytest.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.cli import main

pytest.importorskip("ray")

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def cluster_env(token: str) -> dict[str, str]:
    """The environment of the cluster and of its driver: the project importable, and Ray's token
    authentication (on by default for ``ray start --head`` in Ray 2.60) with this run's own
    token, so that nothing reads or writes the user's ``~/.ray/auth_token``."""
    return {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}  # fmt: skip


@pytest.fixture(scope="module")
def token() -> str:
    return secrets.token_hex(32)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, token: str) -> Iterator[str]:
    """A running head node with 2 CPUs (the three stages' smallest pools: 0.5 + 1 + 0.5)."""
    temp = tmp_path_factory.mktemp("ray")
    log = temp / "ray-start.log"
    port = free_port()
    env = cluster_env(token)
    with log.open("w") as out:
        head = subprocess.Popen(
            [str(RAY), "start", "--head", "--port", str(port), "--num-cpus", "2",
             "--include-dashboard", "false", "--object-store-memory", str(200 * 2**20),
             "--temp-dir", str(temp / "t"), "--disable-usage-stats", "--block"],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text():
            assert head.poll() is None, f"ray start exited {head.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"ray start did not start:\n{log.read_text()}"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        head.send_signal(signal.SIGTERM)  # --block: it stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=10)


def photos(folder: Path, count: int) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for i in range(count):
        pixels = rng.integers(0, 256, (32 + 4 * i, 40 + 8 * i), dtype=np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"p{i}.png")
    (folder / "sub").mkdir()
    Image.fromarray(rng.integers(0, 256, (40, 48), dtype=np.uint8), mode="L").save(
        folder / "sub" / "q.jpg"
    )
    return folder


def test_a_file_uri_on_a_cluster_address_gives_the_local_engines_bytes(
    cluster: str, token: str, tmp_path: Path, zoo_weights: Path
) -> None:
    source = photos(tmp_path / "in", 3)
    common = ["--no-progress", "--weights-dir", str(zoo_weights), "--model", "zhang-eccv16",
              "--precision", "fp32", "--device", "cpu", "--batch-size", "2"]  # fmt: skip
    assert main(["colorize", str(source), "-o", str(tmp_path / "local"), *common]) == 0
    dest = tmp_path / "ray"
    env = cluster_env(token)
    done = subprocess.run(
        [sys.executable, "-m", "service", "colorize", source.as_uri(), "-o", str(dest), *common,
         "--engine", "ray", "--ray-address", cluster],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=400, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "4 colorized, 0 failed, 0 skipped" in done.stdout

    def pngs(folder: Path) -> dict[str, bytes]:
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*.png")}

    local = pngs(tmp_path / "local")
    assert sorted(local) == ["p0.png", "p1.png", "p2.png", "sub/q.png"]
    assert pngs(dest) == local
    lines = [json.loads(line) for line in (dest / "colorize-report.jsonl").read_text().splitlines()]
    assert sorted(line["custom_id"] for line in lines) == [
        "p0.png",
        "p1.png",
        "p2.png",
        "sub/q.jpg",
    ]
    assert {line["source"] for line in lines} == {
        (source / name).as_uri() for name in ("p0.png", "p1.png", "p2.png", "sub/q.jpg")
    }
