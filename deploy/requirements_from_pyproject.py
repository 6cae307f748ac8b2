"""Write the image's dependency files from ``pyproject.toml`` (used by the Dockerfile).

The CUDA base image already ships torch and torchvision, built for its CUDA version. A plain
``pip install .`` could replace them with wheels built for another CUDA (or CPU ones) and add
gigabytes to the image. So the Dockerfile installs the dependency layer from two files written
here, before the source is copied (the layer is rebuilt only when pyproject.toml changes):

- ``requirements.txt``: ``[project].dependencies`` as declared (torch>=..., fastapi>=..., ...),
  plus those of the extras named by ``--extras`` (the image's ``IMAGE_EXTRAS``: tracing);
- ``constraints.txt``: the packages the base image provides (torch, torchvision) pinned to the
  versions installed there. pip then finds them already satisfied and never downloads another
  build, and a base image whose torch is older than the project's lower bound fails the build
  with a resolution error instead of failing at run time.

Only the standard library is used: this runs before any dependency is installed.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from importlib import metadata
from pathlib import Path

PROVIDED_BY_BASE = ("torch", "torchvision")


def installed_pins(provided: list[str]) -> list[str]:
    """``name==version`` for each provided package, as installed in this interpreter."""
    pins = []
    for name in provided:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            raise SystemExit(
                f"the base image does not provide {name}; choose a PyTorch image that ships "
                f"{', '.join(provided)} (BASE_IMAGE build argument)"
            ) from None
    return pins


def check_python(requires_python: str | None) -> None:
    if not requires_python or not requires_python.startswith(">="):
        return
    floor = tuple(int(part) for part in requires_python[2:].split(",")[0].split("."))
    if sys.version_info[: len(floor)] < floor:
        raise SystemExit(
            f"the base image's Python {sys.version.split()[0]} does not satisfy the project's "
            f"requires-python {requires_python}; choose another BASE_IMAGE"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write requirements.txt and constraints.txt.")
    parser.add_argument("pyproject", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="folder for the two files")
    parser.add_argument(
        "--provided", nargs="*", default=list(PROVIDED_BY_BASE),
        help="packages the base image provides: pinned, never reinstalled",
    )  # fmt: skip
    parser.add_argument(
        "--extras", default="",
        help="comma-separated optional-dependency groups to add (e.g. tracing)",
    )  # fmt: skip
    args = parser.parse_args(argv)

    project = tomllib.loads(args.pyproject.read_text())["project"]
    check_python(project.get("requires-python"))
    args.out.mkdir(parents=True, exist_ok=True)
    requirements = list(project["dependencies"])
    optional = project.get("optional-dependencies", {})
    for extra in filter(None, (e.strip() for e in args.extras.split(","))):
        if extra not in optional:
            raise SystemExit(f"no extra {extra!r} in pyproject.toml; known: {', '.join(optional)}")
        requirements += optional[extra]
    (args.out / "requirements.txt").write_text("\n".join(requirements) + "\n")
    (args.out / "constraints.txt").write_text("\n".join(installed_pins(args.provided)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
