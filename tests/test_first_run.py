"""What a newcomer meets first: the command line's imports, version and help, the weight paths
the messages name, the offline advice of fetch-weights, and the links of README.md and docs/."""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from service import cli
from service.settings import ModelSettings
from service.weights.fetch import fetch_weights, planned_files
from service.weights.sources import UnreachableError, WeightSources

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "uvicorn", "fastapi", "starlette", "redis", "models.pipeline")


def test_building_the_parser_imports_no_heavy_dependency() -> None:
    """Every command module is imported for --help: none may pull in another command's stack."""
    code = (
        "import sys\n"
        "from service.cli import build_parser\n"
        "build_parser()\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert result.stdout.strip() == "[]"


def test_a_missing_package_says_to_use_the_venv(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def needs_uvicorn(args: argparse.Namespace) -> int:
        raise ModuleNotFoundError("No module named 'uvicorn'", name="uvicorn")

    real_build = cli.build_parser

    def build() -> argparse.ArgumentParser:
        parser = real_build()
        parser.set_defaults(func=needs_uvicorn)
        for action in parser._subparsers._group_actions:  # type: ignore[union-attr]
            for sub in action.choices.values():  # type: ignore[union-attr]
                sub.set_defaults(func=needs_uvicorn)
        return parser

    monkeypatch.setattr(cli, "build_parser", build)
    assert cli.main(["serve"]) == 1
    err = capsys.readouterr().err
    assert "'uvicorn' is not installed" in err
    assert ".venv/bin/python -m service" in err and "source .venv/bin/activate" in err


@pytest.mark.parametrize(
    ("module", "command", "extra"),
    [
        ("lpips", "evaluate", "eval"),
        ("pytorch_fid.inception", "evaluate", "eval"),
        ("skimage", "evaluate", "eval"),
        ("skimage", "train", "train"),
        ("matplotlib", "train", "train"),
        ("jinja2", None, "eval"),
        ("evaluation", "evaluate", "eval"),  # the package itself, left out of the image
        ("evaluation", "train", "train"),  # validation scores with evaluation.metrics
        ("training", "train", "train"),
        ("skimage", "prepare-data", "train"),
    ],
)
def test_a_missing_extra_is_named(module: str, command: str | None, extra: str) -> None:
    message = cli.missing_package_message(
        ModuleNotFoundError(f"No module named {module!r}", name=module), command
    )
    top = module.split(".")[0]
    assert message.startswith(
        f"error: No module named {top!r}: install the {extra} extra: pip install -e '.[{extra}]'"
    )


def test_the_extras_table_matches_pyproject() -> None:
    """Every distribution of the eval and train extras has its module in MODULE_EXTRAS, under
    exactly the extras that list it; no base dependency is in the table."""
    import tomllib
    from importlib.metadata import packages_distributions

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}

    extras = {extra: names(project["optional-dependencies"][extra]) for extra in ("eval", "train")}
    base = names(project["dependencies"])
    distribution_of = {
        module: {d.lower() for d in dists} for module, dists in packages_distributions().items()
    }
    for module, listed in cli.MODULE_EXTRAS.items():
        if module in cli.OWN_PACKAGES:
            continue
        (distribution,) = distribution_of[module]
        assert distribution not in base, module
        assert {e for e, dists in extras.items() if distribution in dists} == set(listed), module
    covered = {next(iter(distribution_of[m])) for m in cli.MODULE_EXTRAS if m in distribution_of}
    assert set().union(*extras.values()) <= covered
    assert cli.COMMAND_EXTRAS == {"evaluate": "eval", "prepare-data": "train", "train": "train"}
    [own] = [
        r for r in project["optional-dependencies"]["dev"] if r.startswith("instcolor-service[")
    ]
    assert {"train", "eval"} <= set(own.removeprefix("instcolor-service[").rstrip("]").split(","))


def test_our_own_broken_import_is_not_disguised(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(args: argparse.Namespace) -> int:
        raise ModuleNotFoundError("No module named 'service.nope'", name="service.nope")

    real_build = cli.build_parser

    def build() -> argparse.ArgumentParser:
        parser = real_build()
        for action in parser._subparsers._group_actions:  # type: ignore[union-attr]
            for sub in action.choices.values():  # type: ignore[union-attr]
                sub.set_defaults(func=broken)
        return parser

    monkeypatch.setattr(cli, "build_parser", build)
    with pytest.raises(ModuleNotFoundError):
        cli.main(["serve"])


def test_a_missing_evaluation_package_is_an_extra_but_a_missing_module_in_it_is_a_bug() -> None:
    assert not cli._is_own_code("evaluation")
    assert not cli._is_own_code("training")
    assert cli._is_own_code("evaluation.nope")
    assert cli._is_own_code("models")
    assert cli._is_own_code(None)
    assert not cli._is_own_code("lpips")


# -- commands import only what they use (issue 18 item 4) ---------------------------------------

SERVING_MODULES = ("fastapi", "starlette", "uvicorn", "redis", "prometheus_client")
"""What only the HTTP process and the Redis worker use: no offline command may import them."""
EXTRA_MODULES = tuple(m for m in cli.MODULE_EXTRAS if m not in cli.OWN_PACKAGES)
EVAL_ONLY_MODULES = tuple(m for m in EXTRA_MODULES if cli.MODULE_EXTRAS[m] == ("eval",))

ISOLATED = """
import importlib.abc, json, sys
blocked, watched, argv = json.loads(sys.argv[1])

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None

sys.meta_path.insert(0, Block())
from service.cli import main
try:
    code = main(argv)
except SystemExit as exc:
    code = exc.code
sys.stdout.flush()
print("RESULT " + json.dumps([code, sorted(m for m in watched if m in sys.modules)]))
"""


def run_isolated(
    argv: list[str], cwd: Path, blocked: tuple[str, ...] = ()
) -> tuple[int, list[str], str]:
    """Run ``main(argv)`` in a fresh interpreter where ``blocked`` cannot be imported; return the
    exit code, which of SERVING_MODULES ended up imported, and stderr."""
    import json

    env = {**os.environ, "PYTHONPATH": str(REPO), "COLORIZE_PRECISION": "fp32"}
    result = subprocess.run(
        [sys.executable, "-c", ISOLATED, json.dumps([blocked, SERVING_MODULES, argv])],
        capture_output=True, text=True, check=False, cwd=cwd, env=env, timeout=300,
    )  # fmt: skip
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, result.stderr
    code, loaded = json.loads(lines[-1][len("RESULT ") :])
    return code, loaded, result.stderr


def _colour_photos(folder: Path, count: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.merge("RGB", [Image.linear_gradient("L").resize((48 + i, 40)).rotate(90 * k)
                            for k in range(3)]).save(folder / f"p{i}.png")  # fmt: skip
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("command", ["colorize", "prepare-data", "evaluate", "train"])
def test_offline_commands_never_import_the_serving_stack(
    command: str, tmp_path: Path, tiny_checkpoints: Path
) -> None:
    """``--help`` and a real run of each command (train: one step) import none of fastapi,
    uvicorn, redis and prometheus_client; colorize runs with every extra's module made
    unimportable (serving needs no extra), prepare-data and train without the eval extra's."""
    code, loaded, err = run_isolated([command, "--help"], tmp_path)
    assert (code, loaded) == (0, []), err
    photos = _colour_photos(tmp_path / "photos", 2)
    out = str(tmp_path / "out")
    no_model = ["--no-detector", "--no-progress", "--checkpoints", str(tiny_checkpoints)]
    runs: dict[str, tuple[list[str], tuple[str, ...], int]] = {
        "colorize": ([command, str(photos), "-o", out, *no_model], EXTRA_MODULES, 0),
        "prepare-data": (
            [command, str(photos), "--output", out, "--no-detector", "--no-progress"],
            EVAL_ONLY_MODULES,
            0,
        ),
        "evaluate": ([command, str(photos), "-o", out, *no_model], (), 0),
        "train": (
            [command, "--stage", "full", "--data", str(tmp_path / "data"), "--init",
             str(tiny_checkpoints), "--output", out, "--max-steps", "1", "--batch-size", "2",
             "--workers", "0", "--no-progress"],
            EVAL_ONLY_MODULES,
            0,
        ),
    }  # fmt: skip
    if command == "train":  # its input: a manifest of the photos
        assert cli.main(["prepare-data", str(photos), "--output", str(tmp_path / "data"),
                         "--no-detector", "--no-progress"]) == 0  # fmt: skip
    argv, blocked, expected = runs[command]
    code, loaded, err = run_isolated(argv, tmp_path, blocked)
    assert code == expected, err
    assert loaded == [], f"{command} imported {loaded}"
    written = {"colorize": "p0.png", "prepare-data": "manifest.jsonl", "evaluate": "metrics.csv",
               "train": "checkpoints/latest_net_GComp.pth"}  # fmt: skip
    assert (Path(out) / written[command]).is_file()


@pytest.mark.parametrize(
    ("command", "extra"), [("evaluate", "eval"), ("prepare-data", "train"), ("train", "train")]
)
def test_a_command_run_without_its_extra_names_it(command: str, extra: str, tmp_path: Path) -> None:
    argv = {
        "evaluate": [command, str(tmp_path), "-o", str(tmp_path / "report")],
        "prepare-data": [
            command,
            str(tmp_path),
            "--output",
            str(tmp_path / "data"),
            "--no-detector",
        ],
        "train": [
            command,
            "--stage",
            "full",
            "--data",
            str(tmp_path),
            "--init",
            str(tmp_path),
            "--output",
            str(tmp_path / "run"),
        ],
    }[command]
    code, _, err = run_isolated(argv, tmp_path, blocked=("skimage",))
    assert code == 1
    assert (
        f"No module named 'skimage': install the {extra} extra: pip install -e '.[{extra}]'" in err
    )
    assert "Traceback" not in err


def test_version_names_the_program(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"instcolor {cli.__version__}"
    assert cli.program_name("/x/.venv/bin/instcolor") == "instcolor"
    assert cli.program_name("/x/service/__main__.py") == "python -m service"


@pytest.mark.parametrize("command", ["colorize", "fetch-weights", "serve", "worker"])
def test_help_is_plain_text(command: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", command, "--help"],
        capture_output=True, text=True, check=True, cwd=REPO,
    )  # fmt: skip
    assert "::" not in result.stdout and "``" not in result.stdout and "\\\\" not in result.stdout
    if command == "serve":
        assert "uvicorn --factory service.app:app_from_env" in result.stdout


def test_missing_weights_are_named_where_fetch_weights_puts_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("COLORIZE_"):
            monkeypatch.delenv(name)
    missing = ModelSettings().missing_weight_files()  # the defaults, nothing on disk
    fetched = [p.path for p in planned_files(Path("weights"))]  # fetch-weights' default --dir
    assert missing == fetched
    assert Path("weights/checkpoints/coco_finetuned_mask_256_ffs/latest_net_G.pth") in missing


def test_missing_weights_in_a_folder_holding_some_files_directly(tmp_path: Path) -> None:
    from models.checkpoints import missing_files

    (tmp_path / "latest_net_G.pth").write_bytes(b"")
    assert missing_files(tmp_path) == [
        tmp_path / "latest_net_GF.pth",
        tmp_path / "latest_net_GComp.pth",
    ]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_offline_fetch_lists_every_missing_file_and_what_to_do(tmp_path: Path) -> None:
    sources = WeightSources.mirror(f"http://127.0.0.1:{_closed_port()}/")
    with pytest.raises(UnreachableError) as raised:
        fetch_weights(tmp_path, sources=sources, timeout=5, progress=False)
    message = str(raised.value)
    expected = [str(p.path) for p in planned_files(tmp_path, sources=sources)]
    listed = re.search(r"Missing now:\n((?:  .*\n)+)", message + "\n")
    assert listed and [line.strip() for line in listed.group(1).splitlines()] == expected
    assert f"fetch-weights --dir {tmp_path} --base-url" in message
    for name in ("checkpoints.zip", "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"):
        assert name in message
    for path in expected:
        assert f"->  {path}" in message
    assert not any(tmp_path.rglob("*.part")), "nothing half-written is left"


def test_offline_fetch_through_the_cli_exit_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLORIZE_WEIGHTS_BASE_URL", f"http://127.0.0.1:{_closed_port()}/")
    code = cli.main(["fetch-weights", "--dir", str(tmp_path), "--variant", "mmagic",
                     "--detector", "none", "--no-progress", "--timeout", "5"])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert "inst-colorizatioon_full_official_cocostuff-256x256-5b9d4eee.pth" in err
    assert "--variant mmagic --detector none --base-url" in err


# -- the documentation's links ------------------------------------------------------------------


def _slugs(markdown: str) -> list[str]:
    """GitHub's heading slugs, in order: lower case, punctuation dropped, spaces to '-'."""
    slugs = []
    in_fence = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        if in_fence or not re.match(r"#+ ", line):
            continue
        title = line.lstrip("#").strip().lower()
        slugs.append(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return slugs


def _anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings: a repeated slug gets -1, -2, ..."""
    seen: dict[str, int] = {}
    anchors = set()
    for slug in _slugs(markdown):
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _links(markdown: str) -> list[str]:
    text = re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize(
    "page", [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))], ids=lambda p: p.name
)
def test_every_link_and_anchor_resolves(page: Path) -> None:
    for link in _links(page.read_text()):
        if re.match(r"[a-z]+:", link):
            continue  # http(s) links: not fetched (no network in tests)
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.name}: {link} -> {path} does not exist"
        if anchor:
            assert anchor in _anchors(path.read_text()), f"{page.name}: {link}: no such heading"


def test_no_page_has_two_equal_headings() -> None:
    """Equal headings make ambiguous anchors (a link lands on the first of them)."""
    for page in [REPO / "README.md", *(REPO / "docs").glob("*.md")]:
        slugs = _slugs(page.read_text())
        assert len(slugs) == len(set(slugs)), (
            f"{page.name}: {sorted(s for s in slugs if slugs.count(s) > 1)}"
        )
