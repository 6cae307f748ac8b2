#!/usr/bin/env bash
# Download the wheels a GPU host without a package index lacks, for `serve` and the load tests,
# into wheelhouse/ (gitignored). Run where pip reaches PyPI; carry wheelhouse/ to the GPU host;
# loadtests/gpu_check.sh installs them with pip --no-index --find-links wheelhouse.
#
#   bash loadtests/fetch_gpu_wheels.sh            # Python 3.12 (the lent H200 image), x86_64
#   PY_VERSION=3.11 bash loadtests/fetch_gpu_wheels.sh
#
# The GPU image already has torch 2.11, torchvision 0.26, numpy, pillow, prometheus-client,
# anyio, h11, click, httpx, uvloop, pyyaml, tqdm, typing-extensions (docs/performance.md).
# Versions: the ones installed in this environment (what the tests ran with), else the newest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PY_VERSION=${PY_VERSION:-3.12}
PACKAGES="pydantic pydantic-core pydantic-settings python-dotenv annotated-types typing-inspection
fastapi fastapi-offline starlette annotated-doc uvicorn python-multipart redis
prometheus-fastapi-instrumentator"
specs=$($PY - $PACKAGES <<'PYEOF'
import sys
from importlib import metadata
for name in sys.argv[1:]:
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(name)
PYEOF
)
mkdir -p wheelhouse
$PY -m pip download --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d wheelhouse $specs
ls -1 wheelhouse
