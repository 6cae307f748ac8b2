"""The README's quick start, taken from README.md itself and run on a clean clone of HEAD.

The commands are the fenced ``bash`` blocks between ``<!-- quickstart:NAME -->`` and
``<!-- /quickstart:NAME -->``; the weight file paths are the block ``quickstart:weight-files``.
The repository's committed ``HEAD`` is cloned (``git clone``) into a temporary folder, and the
commands run there in order, in bash, with ``set -euo pipefail``. How each line is treated:

* ``apt-get update && apt-get install PKGS`` (system packages; needs root and a network): not run. Each
  package must be installed here (``dpkg-query``), and the list must equal ``APT_PACKAGES`` in
  ``.ci/run``, so CI installs what the README tells a newcomer to install.
* ``python3 -m venv .venv`` and ``pip install ...`` (a second multi-GB install would take minutes):
  not run. ``.venv`` in the clone becomes a link to the environment running this test, and every
  requirement of the clone's ``pyproject.toml`` must be installed in it. ``source
  .venv/bin/activate`` then runs as written.
* ``python -m pytest`` (the suite that is running this very test): run as written plus
  ``--collect-only -q``; it must collect the whole suite, this file included, without errors.
* ``python -m service fetch-weights`` (downloads; tests never download): run as written with
  ``COLORIZE_WEIGHTS_BASE_URL`` at a closed loopback port, i.e. as on an offline host. It must
  fail (exit 1) and list exactly the README's weight file paths as missing, with the mirror and
  copy-by-hand advice. The test then does what the README says for offline hosts: it writes
  seeded random-weight files (tiny networks, a random Mask R-CNN) at exactly those paths.
* Everything else runs as written, except that port 8000 becomes a free port. The environment
  has no ``COLORIZE_*`` variable but the weights mirror above: the service's defaults (on a CPU
  a one-image warm-up) are what a newcomer gets.

Then the results are checked: the colorized files (size, mode, format), readiness, the warm-up
log lines and the server's clean exit after ``kill %1``.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from PIL import Image
from weight_files import write_official

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def marked_blocks(text: str, name: str) -> list[str]:
    """The fenced blocks between ``<!-- quickstart:NAME -->`` and ``<!-- /quickstart:NAME -->``."""
    found = re.search(rf"<!-- quickstart:{name} -->(.*?)<!-- /quickstart:{name} -->", text, re.S)
    assert found, f"README.md has no quickstart:{name} section"
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", found.group(1), re.S | re.M)
    assert blocks, f"quickstart:{name} has no fenced block"
    return blocks


def commands(text: str, name: str) -> list[str]:
    """Command lines of a section: comments (`` # ...``) and blank lines dropped."""
    lines = []
    for block in marked_blocks(text, name):
        for line in block.splitlines():
            command = re.sub(r"(^|\s+)#\s.*$", "", line).strip()
            if command:
                lines.append(command)
    return lines


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ci_apt_packages() -> list[str]:
    found = re.search(r"^APT_PACKAGES=\(([^)]*)\)", (REPO / ".ci" / "run").read_text(), re.M)
    assert found, ".ci/run has no APT_PACKAGES=(...) line"
    return found.group(1).split()


def check_apt_line(line: str) -> None:
    """``[sudo] apt-get update && [sudo] apt-get install -y PKGS``: the packages are installed."""
    *updates, command = (part.strip() for part in line.split("&&"))
    for update in updates:
        assert re.fullmatch(r"(sudo )?apt-get update", update), line
    words = shlex.split(command)
    words = words[1:] if words[0] == "sudo" else words
    assert words[:2] == ["apt-get", "install"], line
    packages = [w for w in words[2:] if not w.startswith("-")]
    assert sorted(packages) == sorted(ci_apt_packages()), "README apt-get line != .ci/run"
    for package in packages:
        status = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", package],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert "install ok installed" in status.stdout, f"{package} is not installed here"


def check_environment_has_requirements(clone: Path) -> None:
    project = tomllib.loads((clone / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]  # dev pulls train and eval
    requirements = project["dependencies"] + [r for group in extras.values() for r in group]
    for requirement in requirements:
        name = re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(
                f"{name} (from the clone's pyproject.toml) is not installed in {sys.prefix}"
            )


def run_bash(
    script: str, cwd: Path, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + script],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def test_readme_quick_start_on_a_clean_clone(
    tmp_path: Path, detector_weights: Path, gray_photo: Image.Image
) -> None:
    readme = README.read_text()
    install = commands(readme, "install")
    fetch = commands(readme, "weights")
    run = commands(readme, "run")
    weight_files = [Path(line) for line in commands(readme, "weight-files")]

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    gray_photo.convert("L").save(clone / "photo.jpg", quality=90)

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLORIZE_")}
    env.pop("PYTHONPATH", None)  # the clone's own code, nothing else
    env.pop("VIRTUAL_ENV", None)
    env["COLORIZE_WEIGHTS_BASE_URL"] = f"http://127.0.0.1:{free_port()}/"  # nothing listens there
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(sys.prefix)
    )  # `python` must come from `source .venv/bin/activate`, as for a newcomer

    # -- install: checked, the venv linked (see the module docstring) ---------------------------
    preamble: list[str] = []  # lines every later step runs first (source .venv/bin/activate)
    test_commands: list[str] = []
    for command in install:
        if re.match(r"(sudo )?apt-get ", command):
            check_apt_line(command)
        elif re.fullmatch(r"python3? -m venv \.venv", command):
            (clone / ".venv").symlink_to(sys.prefix, target_is_directory=True)
            check_environment_has_requirements(clone)
        elif re.match(r"(\.venv/bin/)?pip install ", command):
            check_environment_has_requirements(clone)
        elif command.startswith("source "):
            preamble.append(command)
        elif re.match(r"(\.venv/bin/)?python -m pytest\b", command):
            test_commands.append(command + " --collect-only -q")
        else:
            pytest.fail(f"the install section has a line this test does not know: {command}")
    assert preamble, "the quick start never activates the venv"
    assert test_commands, "the quick start has no test command"

    which = run_bash(
        "\n".join([*preamble, "python -c 'import service; print(service.__file__)'"]),
        clone,
        env,
        60,
    )
    assert which.returncode == 0, which.stderr
    assert Path(which.stdout.strip()).resolve().is_relative_to(clone.resolve()), which.stdout

    collected = run_bash("\n".join(preamble + test_commands), clone, env, 300)
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]
    assert "tests/test_readme.py::test_readme_quick_start_on_a_clean_clone" in collected.stdout

    # -- weights: fetch-weights as on an offline host, then the files written by hand -----------
    assert len(fetch) == 1 and "fetch-weights" in fetch[0], fetch
    fetched = run_bash("\n".join([*preamble, fetch[0]]), clone, env, 120)
    assert fetched.returncode == 1, fetched.stdout + fetched.stderr
    message = fetched.stderr
    listed = re.search(r"Missing now:\n((?:  .*\n)+)", message)
    assert listed, message
    assert [Path(p.strip()) for p in listed.group(1).splitlines()] == weight_files, message
    assert "--base-url" in message and "copy the files to exactly the paths above" in message
    official = {p.parent for p in weight_files if p.name.startswith("latest_net_")}
    assert len(official) == 1, weight_files
    write_official(clone / official.pop(), width=8, seed=0)
    for path in weight_files:
        if path.name == detector_weights.name:  # a random Mask R-CNN under torchvision's name
            shutil.copy(detector_weights, clone / path)
    assert all((clone / p).is_file() for p in weight_files), "a weight file was not written"

    # -- the first colorization: as written, on a free port ------------------------------------
    script = "\n".join(preamble + [line.replace("8000", str(port)) for line in run])
    result = run_bash(script, clone, env, 300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]

    cli_output = clone / "colorized" / "photo.png"
    with Image.open(cli_output) as image:
        assert image.format == "PNG" and image.mode == "RGB" and image.size == gray_photo.size
    with Image.open(clone / "photo_color.jpg") as image:
        assert image.format == "JPEG" and image.mode == "RGB" and image.size == gray_photo.size
    assert '"status":"ready"' in result.stdout.replace(" ", ""), result.stdout
    assert "1 colorized, 0 failed" in result.stdout
    # on a CPU the default warm-up (COLORIZE_WARMUP_SCOPE=auto) is one image: batch size 1 only
    assert "warm-up: batch of 1 started" in output
    assert re.search(r"warm-up: batch of 1 done in [0-9.]+ s", output)
    assert "warm-up: batch of 2 started" not in output
    loaded = re.search(r"loaded model .*", output)
    assert loaded and len(loaded.group(0)) < 300, "start-up should log one short model line"
    assert "drained and closed" in output, "the server did not shut down cleanly after kill %1"
