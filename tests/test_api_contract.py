"""The served OpenAPI document is the contract: schemathesis fuzzes every operation of a real
``python -m service serve`` process (memory mode, and Redis mode with a real ``worker``) with all
of its checks on, positive and negative data alike.

Two things schemathesis cannot generate are supplied:

- a decodable image: the body is ``format: binary``, and random bytes are not a photo (400 is the
  right answer to them). A small PNG is registered for the image media types (raw body and
  multipart part alike), schemathesis' own mechanism for binary payloads.
- a valid batch submission (positive cases of ``POST /batches`` only, by the same hook): the
  file fields are ``format: binary`` and the text fields hold JSON, so random values are rightly
  refused with 422. The hook sends a real zip of one PNG and JSON objects for ``options`` and
  ``metadata``; negative cases keep schemathesis' own bodies and must be refused with a 4xx.
- ``boxes`` (positive cases only, by a hook): the parameter is a string whose JSON content is described by ``contentSchema``,
  which schemathesis does not generate from (it draws any JSON for ``contentMediaType:
  application/json``). And two of its rules cannot be written in JSON Schema at all: x2 > x1 and
  y2 > y1 within a box, and as many scores as boxes. The hook draws ``boxes`` from a strategy
  that follows the served contentSchema *and* those rules, and checks every draw against the
  contentSchema read from the document, so the generator cannot drift from the contract.

- ``hints`` (positive cases only, by the same hook): also a string holding JSON (contentSchema a
  list of HintPoint), and the rules JSON Schema cannot state (a point inside the image; a model
  that takes hints) refuse every non-empty list on these servers, which load ``instcolor`` only
  (it takes none: 422, as documented). Positive cases send the empty list, which means "no
  hints"; the hint values themselves are tested against their schema in tests/test_hints.py.
- ``temperature`` (positive cases only, by the same hook): a rule JSON Schema cannot state (a
  model that decodes by the annealed mean, zhang-eccv16 or li-dcnn) refuses every value on these
  servers, which load ``instcolor`` only (422, as documented). Positive cases leave it out (the
  model's default); the values are tested in tests/test_temperature_serving.py.

Negative cases are left untouched: whatever schemathesis breaks must be refused with a 4xx.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from redis_fixtures import redis_url  # noqa: F401 (the fixture)
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig
from schemathesis.config._checks import NEGATIVE_DATA_REJECTION_EXPECTED_STATUSES
from schemathesis.specs.openapi.checks import negative_data_rejection

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = int(os.environ.get("COLORIZE_CONTRACT_EXAMPLES", "100"))  # per operation and phase


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def small_png(width: int = 24, height: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.linear_gradient("L").resize((width, height)).save(buffer, "PNG")
    return buffer.getvalue()


PNG = small_png()
# The documented way to give schemathesis bytes of a binary media type: the raw bodies
# (image/*, application/octet-stream) and the multipart part (its encoding names the same
# types) are drawn from these. Negative cases keep them too, and break something else.
schemathesis.openapi.media_type(
    "image/png", st.just(PNG), aliases=["image/*", "application/octet-stream"]
)


def box_strategy(limit: float) -> st.SearchStrategy[list[float]]:
    """[x1, y1, x2, y2] within +-limit with x2 > x1 and y2 > y1."""
    coordinate = st.floats(-limit, limit - 1.0, allow_nan=False, allow_infinity=False)
    extent = st.floats(1.0, 1e5, allow_nan=False, allow_infinity=False)

    def build(values: tuple[float, float, float, float]) -> list[float]:
        x1, y1, w, h = values
        return [x1, y1, min(x1 + w, limit), min(y1 + h, limit)]

    return st.tuples(coordinate, coordinate, extent, extent).map(build)


def boxes_strategy(parameter: dict[str, Any]) -> st.SearchStrategy[str]:
    """``boxes`` texts the server must accept, from the served parameter schema."""
    content = parameter["contentSchema"]
    box_list = content["anyOf"][0]
    limit = float(box_list["items"]["items"]["maximum"])
    plain = st.lists(box_strategy(limit), max_size=min(int(box_list["maxItems"]), 8))
    scored = plain.flatmap(
        lambda boxes: st.builds(
            lambda scores: {"boxes": boxes, "scores": scores},
            st.lists(
                st.floats(-1e6, 1e6, allow_nan=False), min_size=len(boxes), max_size=len(boxes)
            ),
        )
    )
    validator = jsonschema.Draft202012Validator(content)

    def text(value: object) -> str:
        validator.validate(value)  # the generator stays inside the documented contentSchema
        encoded = json.dumps(value)
        assert len(encoded) <= parameter["maxLength"]
        return encoded

    return st.one_of(plain, scored, st.just({"boxes": []})).map(text)


def small_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("scans/one.png", PNG)
    return buffer.getvalue()


ZIP = small_zip()
schemathesis.openapi.media_type("application/zip", st.just(ZIP), aliases=["application/x-tar"])
BATCH_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "options": st.sampled_from(["{}", '{"saturation": 1.2}', '{"format": "png"}']),
        "metadata": st.dictionaries(
            st.text("abcdefgh", min_size=1, max_size=8), st.text(max_size=16), max_size=3
        ).map(json.dumps),
    },
)


def install_positive_inputs(schema: Any) -> None:
    """The hook described in the module docstring (positive cases of POST /colorize and /batches)."""
    raw = schema.raw_schema
    parameters = raw["paths"]["/colorize"]["post"]["parameters"]
    boxes = boxes_strategy(next(p for p in parameters if p["name"] == "boxes")["schema"])

    @schema.hook
    def flatmap_case(context: Any, case: Any) -> st.SearchStrategy[Any]:
        meta = case.meta
        positive = meta is None or meta.generation.mode.is_positive
        if case.operation.path == "/batches" and case.method.upper() == "POST" and positive:

            def with_batch(fields: dict[str, Any]) -> Any:
                archive = (case.body or {}).get("archive", ZIP)  # drawn from the media type
                case.body = {"archive": archive, **fields}
                return case

            return BATCH_FIELDS.map(with_batch)
        if case.operation.path != "/colorize" or not positive:
            return st.just(case)
        if case.query and "hints" in case.query:
            case.query = {**case.query, "hints": "[]"}
        if case.query and "temperature" in case.query:
            case.query = {k: v for k, v in case.query.items() if k != "temperature"}
        if not case.query or "boxes" not in case.query:
            return st.just(case)

        def with_boxes(text: str) -> Any:
            case.query = {**case.query, "boxes": text}
            return case

        return boxes.map(with_boxes)


def env_for(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLORIZE_")}
    env.update(
        OMP_NUM_THREADS="1", COLORIZE_DEVICE="cpu", COLORIZE_WARMUP="false",
        COLORIZE_MAX_BATCH_SIZE="2", COLORIZE_MAX_BATCH_DELAY_MS="5",
        COLORIZE_HOST="127.0.0.1", COLORIZE_LOG_LEVEL="WARNING",
        COLORIZE_REQUEST_TIMEOUT_S="60",
        COLORIZE_BATCH_MAX_OPEN_PER_KEY="10000",  # every positive POST /batches is accepted
    )  # fmt: skip
    state = tempfile.mkdtemp(prefix="contract-state-")
    env.update(COLORIZE_STATE_DIR=state, COLORIZE_BATCH_OUTPUT_DIR=os.path.join(state, "out"))
    env.update(extra)
    return env


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "service", *args], cwd=ROOT, env=env,
        stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip


def wait_ready(
    base: str,
    procs: list[subprocess.Popen[bytes]],
    log: Path,
    headers: dict[str, str] | None = None,
) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for proc in procs:
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        try:
            ready = httpx.get(base + "/readyz", headers=headers, timeout=2).status_code == 200
            # Redis mode: ready once a worker's heartbeat is seen; one real request proves it
            if (
                ready
                and httpx.post(
                    base + "/colorize",
                    content=PNG,
                    headers={**(headers or {}), "content-type": "image/png"},
                    timeout=30,
                ).status_code
                == 200
            ):
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the service did not become ready:\n{log.read_text()[-3000:]}")


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# Every check stays on with its defaults, but for one addition: negative data may also be refused
# with 408, 413 or 431 (schemathesis' default list of refusals omits them). A negated ``boxes``
# longer than maxLength can make the request line longer than max_header_bytes; the HTTP server
# then refuses it with 431 before the route sees it, which is the documented refusal.
NEGATIVE_REFUSALS = [*NEGATIVE_DATA_REJECTION_EXPECTED_STATUSES, "408", "413", "431"]
CONFIG = {"checks": {"negative_data_rejection": {"expected-statuses": NEGATIVE_REFUSALS}}}


def loaded_schema(base: str) -> Any:
    config = SchemathesisConfig.from_dict(CONFIG)
    schema = schemathesis.openapi.from_url(base + "/openapi.json", config=config)
    install_positive_inputs(schema)
    return schema


@pytest.fixture(scope="module")
def memory_service(
    tiny_checkpoints: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("contract") / "serve.log"
    args = ["serve", "--checkpoints", str(tiny_checkpoints), "--no-detector", "--port", str(port)]
    proc = spawn(args, env_for(), log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, [proc], log)
        yield base
    finally:
        stop([proc])
    assert "Traceback" not in log.read_text(errors="replace"), log.read_text()[-3000:]


@pytest.fixture(scope="module")
def redis_service(
    tiny_checkpoints: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[str]:
    url = str(request.getfixturevalue("redis_url"))  # the shared server, or our own
    prefix = f"test-contract-{os.getpid()}-{time.monotonic_ns()}"
    env = env_for(COLORIZE_QUEUE="redis", COLORIZE_REDIS_URL=url, COLORIZE_REDIS_PREFIX=prefix)
    folder = tmp_path_factory.mktemp("contract-redis")
    port = free_port()
    api = spawn(["serve", "--port", str(port)], env, folder / "serve.log")
    worker = spawn(
        ["worker", "--checkpoints", str(tiny_checkpoints), "--no-detector",
         "--metrics-port", str(free_port()), "--consumer", "w1"],
        env, folder / "worker.log",
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, [api, worker], folder / "worker.log")
        yield base
    finally:
        stop([api, worker])
        client = redis.Redis.from_url(url)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
    for log in ("serve.log", "worker.log"):
        text = (folder / log).read_text(errors="replace")
        assert "Traceback" not in text, text[-3000:]


KEY = "contract-test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def keyed_service(
    tiny_checkpoints: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """API keys on, probes closed too: the document then declares 401 and its security schemes."""
    port = free_port()
    log = tmp_path_factory.mktemp("contract-keys") / "serve.log"
    args = ["serve", "--checkpoints", str(tiny_checkpoints), "--no-detector", "--port", str(port)]
    env = env_for(COLORIZE_API_KEYS=f"ci:{KEY}", COLORIZE_AUTH_OPEN_PROBES="false")
    proc = spawn(args, env, log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, [proc], log, headers={"Authorization": f"Bearer {KEY}"})
        yield base
    finally:
        stop([proc])


@pytest.fixture(scope="module")
def keyed_schema(keyed_service: str) -> Any:
    return loaded_schema(keyed_service)


@pytest.fixture(scope="module")
def memory_schema(memory_service: str) -> Any:
    return loaded_schema(memory_service)


@pytest.fixture(scope="module")
def redis_schema(redis_service: str) -> Any:
    return loaded_schema(redis_service)


OPERATIONS = [
    ("POST", "/colorize"), ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/info"),
    ("GET", "/metrics"), ("GET", "/models"), ("POST", "/batches"), ("GET", "/batches"),
    ("GET", "/batches/{batch_id}"), ("GET", "/batches/{batch_id}/output"),
    ("GET", "/batches/{batch_id}/errors"), ("GET", "/batches/{batch_id}/archive"),
    ("POST", "/batches/{batch_id}/cancel"),
]  # fmt: skip
# Negative data exists only where there is something to break: /colorize's query and body. The
# other operations take no parameter and no body (asserted below), so only positive data applies.
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    ("POST", "/colorize", GenerationMode.NEGATIVE)
]


def test_every_operation_is_fuzzed(memory_schema: Any) -> None:
    """OPERATIONS is the document's full list: a new route cannot go unfuzzed."""
    served = {(m.upper(), p) for p, item in memory_schema.raw_schema["paths"].items() for m in item}
    assert served == set(OPERATIONS)
    for method, path in OPERATIONS:
        operation = memory_schema.raw_schema["paths"][path][method.lower()]
        takes_input = bool(operation.get("parameters")) or "requestBody" in operation
        assert takes_input == (path == "/colorize" or path.startswith("/batches")), path


def fuzz(
    schema: Any, method: str, path: str, mode: GenerationMode, headers: dict[str, str] | None = None
) -> None:
    """Every check schemathesis has (its default set: all on), for one operation and mode."""
    strategy = schema[path][method].as_strategy(generation_mode=mode)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,  # the same cases on every run: a failure is reproducible
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        database=None,
    )
    @given(case=strategy)
    def run(case: Any) -> None:
        # POST /batches positive bodies come whole from the hook (a real zip, JSON fields). For
        # such a replaced multipart body schemathesis' negative-data check labels the case
        # schema-violating and expects a 4xx; every other check still applies to it.
        replaced = (method, path) == ("POST", "/batches") and mode is GenerationMode.POSITIVE
        excluded = [negative_data_rejection] if replaced else None
        case.call_and_validate(headers=headers, timeout=60, excluded_checks=excluded)

    run()


@pytest.mark.parametrize(
    ("method", "path", "mode"), CASES, ids=lambda v: str(getattr(v, "value", v))
)
def test_memory_mode_meets_its_openapi_contract(
    memory_schema: Any, method: str, path: str, mode: GenerationMode
) -> None:
    fuzz(memory_schema, method, path, mode)


@pytest.mark.parametrize(
    ("method", "path", "mode"), CASES, ids=lambda v: str(getattr(v, "value", v))
)
def test_redis_mode_meets_its_openapi_contract(
    redis_schema: Any, method: str, path: str, mode: GenerationMode
) -> None:
    fuzz(redis_schema, method, path, mode)


@pytest.mark.parametrize(
    ("method", "path", "mode"), CASES, ids=lambda v: str(getattr(v, "value", v))
)
def test_api_key_mode_meets_its_openapi_contract(
    keyed_schema: Any, method: str, path: str, mode: GenerationMode
) -> None:
    """With the key every check holds; schemathesis' ignored_auth check also resends each
    request without it and requires the documented 401."""
    fuzz(keyed_schema, method, path, mode, headers={"Authorization": f"Bearer {KEY}"})
