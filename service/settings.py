"""Typed settings, read from ``COLORIZE_*`` environment variables and validated at start-up.

One class per process role, each the one source of its defaults:

- ``ModelSettings``: what any process that loads the model needs (``colorize``, the server, a GPU
  worker). Command-line flags override the environment (see ``commands/model_flags``).
- ``BatchingSettings``: how jobs are batched, timed out and drained (memory queue, Redis worker).
- ``EdgeSettings``: the public HTTP edge: address, limits, API keys, CORS.
- ``RedisSettings``: Redis mode: the shared Redis, delivery, result cache, worker liveness.
- ``ServiceSettings`` composes them (and the queue choice); every ``COLORIZE_*`` name is unchanged.

The queue and worker configs (``service.queues``) take their field names and defaults from these
classes (``default_of``) instead of restating them.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.constants import DETECTOR_FILENAMES
from service.core.jobs import DEFAULT_MODEL

DEFAULT_WEIGHTS_DIR = Path("weights")
MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
DEFAULT_DETECTOR_FILENAME = DETECTOR_FILENAMES["v1"]  # models.constants: importable without torch


AUTO_BATCH_SIZE = {"cpu": 1, "cuda": 8}
"""Images per device batch where none is given, per device type: ``max_batch_size`` unset (serve,
worker), ``colorize --batch-size auto`` and ``evaluate --batch-size auto``. On a CPU one image's
convolutions already keep every core busy, and batching 8-instance images made each image 13%
slower (docs/performance.md); on CUDA a batch of 8 keeps the device fed."""


def auto_batch_size(device_type: str) -> int:
    """The batch size where none is given, for a ``cpu`` or ``cuda`` device (``cuda:N`` counts
    as ``cuda``; any other type as ``cpu``)."""
    return AUTO_BATCH_SIZE["cuda" if device_type.startswith("cuda") else "cpu"]


def default_of(settings: type[BaseSettings], name: str) -> Any:
    """The default of one settings field: what configs built from the settings default to."""
    return settings.model_fields[name].default


def values_for(config: type[Any], settings: BaseSettings) -> dict[str, Any]:
    """The values of ``settings`` for the dataclass ``config``: each of its fields that has a
    settings field of the same name (configs never rename a setting)."""
    names = type(settings).model_fields
    return {
        f.name: getattr(settings, f.name) for f in dataclasses.fields(config) if f.name in names
    }


_CONFIG = SettingsConfigDict(env_prefix="COLORIZE_", extra="ignore")


class ModelSettings(BaseSettings):
    """Where the weights are and how to run them."""

    model_config = _CONFIG

    weights_dir: Path = Field(
        default=DEFAULT_WEIGHTS_DIR,
        description="Folder of every model's weights: <weights_dir>/<model name>/<official file "
        "name> (InstColorization: checkpoints/ and the detector file, as fetch-weights puts them).",
    )
    models: str = Field(
        default=DEFAULT_MODEL,
        description="Models to load, comma-separated (instcolor, zhang-eccv16, zhang-siggraph17, "
        "...; docs/models.md); the first is the default of POST /colorize. Each one loaded costs "
        "its weights' memory.",
    )
    checkpoints: Path = Field(
        default=DEFAULT_WEIGHTS_DIR / "checkpoints",
        description="InstColorization: folder with latest_net_{G,GF,GComp}.pth (or the unzipped "
        "official checkpoints/ folder above it), or one MMagic .pth file. Default: "
        "<weights_dir>/checkpoints.",
    )
    detector: bool = Field(
        default=True,
        description="Run the Mask R-CNN detector. false: full-image colorization only, unless a "
        "request supplies boxes.",
    )
    detector_weights: Path = Field(
        default=DEFAULT_WEIGHTS_DIR / DEFAULT_DETECTOR_FILENAME,
        description="torchvision COCO Mask R-CNN state dict (read from disk, never downloaded). "
        f"Default: <weights_dir>/{DEFAULT_DETECTOR_FILENAME}.",
    )
    detector_version: Literal["v1", "v2"] = Field(
        default="v1", description="maskrcnn_resnet50_fpn (v1) or maskrcnn_resnet50_fpn_v2 (v2)."
    )
    detector_min_size: int = Field(
        default=800, ge=64, le=4096,
        description="Shorter image side the detector works at (px). Smaller is faster, finds fewer "
        "small objects. 800 is the torchvision/detectron2 default.",
    )  # fmt: skip
    detector_max_size: int = Field(
        default=1333, ge=64, le=8192, description="Cap on the longer side at the detector (px)."
    )
    device: str = Field(
        default="auto", description="auto (cuda if available, else cpu), cpu, cuda or cuda:N."
    )
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        default="auto",
        description="auto: bf16 on CUDA 8.0+ (fp16 on older CUDA); bf16 on a CPU with native "
        "bf16 (AMX or AVX512-BF16), fp32 on other CPUs (there bf16 is emulated and several times slower). fp32 is the parity "
        "mode; fp16 and bf16 keep the fusion softmax and Lab in fp32 (docs/performance.md).",
    )
    channels_last: bool = Field(
        default=True,
        description="Run the networks and the detector in NHWC (channels_last) memory format, "
        "which oneDNN and tensor cores prefer. Same results as NCHW to float rounding.",
    )
    larsson_size: int = Field(
        default=512, ge=64, le=2048, multiple_of=32,
        description="larsson-eccv16: the network's processing size (px, a multiple of 32), the "
        "release's --size; images reach it at half this size, centre-padded. 512 is the "
        "authors' default; smaller is quadratically cheaper and coarser.",
    )  # fmt: skip
    instance_limit: int = Field(
        default=8, ge=0, le=64,
        description="Upper bound on instances per image a request may ask for (the reference uses 8).",
    )  # fmt: skip
    device_crops: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Cut, resize and convert instance crops on the device in one batched call "
        "(on) or with PIL on the host (off: the reference's resampling, bit-exact to it). on "
        "keeps host work off the GPU's critical path; its crops differ slightly from PIL's "
        "(docs/performance.md). auto: on for CUDA, off on a CPU.",
    )

    @model_validator(mode="after")
    def _check(self) -> ModelSettings:
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        # InstColorization's files default under the weights dir unless given themselves
        if "checkpoints" not in self.model_fields_set:
            self.checkpoints = self.weights_dir / "checkpoints"
        if "detector_weights" not in self.model_fields_set:
            self.detector_weights = self.weights_dir / DEFAULT_DETECTOR_FILENAME
        names = self.model_list()
        if not names:
            raise ValueError("models is empty: name at least one model, e.g. instcolor")
        bad = [n for n in names if not MODEL_NAME.match(n)]
        if bad:
            raise ValueError(f"models: {', '.join(map(repr, bad))} is not a model name")
        if len(set(names)) != len(names):
            raise ValueError(f"models: a model is named twice in {self.models!r}")
        return self

    def model_list(self) -> list[str]:
        """``models`` as names, in order (the first is the default model)."""
        return [name.strip() for name in self.models.split(",") if name.strip()]

    @property
    def default_model(self) -> str:
        return self.model_list()[0]

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch  # the HTTP-only API process never needs torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_device_crops(self) -> bool:
        """``device_crops`` for this machine's device (``auto``: on for CUDA only)."""
        if self.device_crops != "auto":
            return self.device_crops == "on"
        return self.resolved_device().startswith("cuda")

    def resolved_precision(self) -> Literal["fp32", "fp16", "bf16"]:
        """``auto`` resolved for this machine (models.precision probes the CPU's bf16 support)."""
        from models.precision import resolve_precision  # imports torch: model processes only

        return resolve_precision(self.precision, self.resolved_device())

    def missing_weight_files(self, models: list[str] | None = None) -> list[Path]:
        """Files that must exist before ``models`` (default: ``model_list()``) can load; empty
        when all are there. An unknown name raises ``models.registry.UnknownModelError``."""
        from models.checkpoints import missing_files  # imports torch: model processes only
        from models.registry import get_model

        missing: list[Path] = []
        for name in models or self.model_list():
            spec = get_model(name)
            if spec.uses_detector:
                missing += missing_files(self.checkpoints)
                if self.detector and not self.detector_weights.is_file():
                    missing.append(self.detector_weights)
            else:
                missing += spec.missing_files(self.weights_dir)
        return missing


class BatchingSettings(BaseSettings):
    """How jobs are batched, timed out and drained: the memory queue and the Redis worker."""

    model_config = _CONFIG

    max_batch_size: int | None = Field(
        default=None, ge=1, le=256,
        description="Most images per device batch. Larger: more throughput on a GPU, more latency "
        "and device memory per batch. Unset: 8 on CUDA, 1 on a CPU (where one image at a time "
        "is the fastest, docs/performance.md).",
    )  # fmt: skip
    max_batch_delay_ms: float = Field(
        default=5.0, ge=0.0, le=10_000.0,
        description="Longest time (ms) the oldest waiting request is held for a batch to fill. "
        "0: run whatever is waiting at once.",
    )  # fmt: skip
    max_concurrent_batches: int = Field(
        default=2, ge=1, le=8,
        description="Batches between admission and the end of inference: 2 lets the next batch "
        "decode on the CPU while the current one runs on the device.",
    )  # fmt: skip
    queue_size: int = Field(
        default=64, ge=1, le=100_000,
        description="Requests waiting for a batch (Redis mode: jobs in the shared stream, waiting "
        "or in process); beyond it requests are refused at once with overload_status and "
        "Retry-After.",
    )  # fmt: skip
    request_timeout_s: float = Field(
        default=30.0, gt=0.0, le=3600.0,
        description="Deadline (s) from admission; a request not served by then gets 504 and is "
        "dropped before it reaches the device.",
    )  # fmt: skip
    retry_after_s: float = Field(
        default=1.0, gt=0.0, le=3600.0,
        description="Smallest Retry-After (s) sent with 503/429; in memory mode it grows with the "
        "queue's backlog.",
    )  # fmt: skip
    drain_timeout_s: float = Field(
        default=60.0, ge=0.0, le=3600.0,
        description="On SIGTERM, how long (s) queued and in-flight requests may take to finish "
        "before the rest are failed with 503.",
    )  # fmt: skip
    warmup: bool = Field(
        default=True,
        description="Run warm-up batches (see warmup_buckets) before /readyz turns 200.",
    )
    warmup_scope: Literal["auto", "full", "minimal"] = Field(
        default="auto",
        description="full: one batch per batch-size bucket (1, 2, 4, ... max_batch_size) with "
        "instance_limit instances per image, so cudnn autotunes every shape before the first "
        "request; minimal: one image with one instance (every network once); auto: full on "
        "CUDA, minimal on CPU, where there is nothing to autotune and a full warm-up at full "
        "width takes minutes.",
    )
    worker_threads: int = Field(
        default=4, ge=1, le=256,
        description="Threads for CPU work (decode, preprocess, full-resolution merge, encode) "
        "that run beside the device thread (at most the process's cores). torch's intra-op "
        "threads follow from it so OpenMP teams fit the cores: (cores - 1) // threads on CUDA, "
        "cores // (threads + 1) on a CPU (service/engine/threads.py).",
    )  # fmt: skip

    @model_validator(mode="after")
    def _check_batching(self) -> BatchingSettings:
        largest_batch = self.max_batch_size or AUTO_BATCH_SIZE["cuda"]
        if self.queue_size < largest_batch:
            raise ValueError(
                f"queue_size ({self.queue_size}) is smaller than max_batch_size "
                f"({largest_batch}), so batches could never fill: raise COLORIZE_QUEUE_SIZE "
                "or lower COLORIZE_MAX_BATCH_SIZE"
            )
        if self.max_batch_delay_ms / 1000.0 >= self.request_timeout_s:
            raise ValueError(
                f"max_batch_delay_ms ({self.max_batch_delay_ms}) is not shorter than "
                f"request_timeout_s ({self.request_timeout_s} s): requests would time out waiting "
                "for a batch; lower COLORIZE_MAX_BATCH_DELAY_MS or raise COLORIZE_REQUEST_TIMEOUT_S"
            )
        return self

    def max_batch_size_for(self, device_type: str) -> int:
        """``max_batch_size``, or where unset the automatic size for ``device_type``."""
        if self.max_batch_size is not None:
            return self.max_batch_size
        return auto_batch_size(device_type)


class EdgeSettings(BaseSettings):
    """The public HTTP edge (docs/security.md): address, HTTP limits the server enforces, the
    image limits checked before decoding, API keys and CORS."""

    model_config = _CONFIG

    host: str = Field(
        default="0.0.0.0",  # noqa: S104 - a service on a GPU host is reached from other machines
        description="Address to bind. 0.0.0.0: every interface; 127.0.0.1: this machine only.",
    )
    port: int = Field(default=8000, ge=1, le=65535, description="TCP port to listen on.")
    max_body_bytes: int = Field(
        default=20 * 1024 * 1024, ge=1024,
        description="Largest request body (bytes); larger bodies get 413 before they are read.",
    )  # fmt: skip
    max_pixels: int = Field(
        default=40_000_000, ge=1,
        description="Largest image (width x height); larger images get 413 from their header, "
        "before decoding (decompression-bomb guard). Full-resolution merge memory grows with it.",
    )  # fmt: skip
    allow_truncated_images: bool = Field(
        default=False,
        description="Decode truncated image data as far as it goes (the missing part grey for "
        "JPEG, black otherwise) instead of refusing it with 400 truncated-image; the answer then "
        "says so (X-Image-Truncated: true, \"truncated\": true). For archives that want best "
        "effort; off, no missing data is ever filled in.",
    )  # fmt: skip
    overload_status: Literal[503, 429] = Field(
        default=503, description="Status for a full queue: 503 or 429 (both carry Retry-After)."
    )
    max_header_bytes: int = Field(
        default=16_384, ge=1024, le=1_048_576,
        description="Largest request line plus headers (bytes); larger gets 431 and the "
        "connection is closed.",
    )  # fmt: skip
    header_timeout_s: float = Field(
        default=10.0, gt=0.0, le=600.0,
        description="Time (s) a client has to send the request line and headers, counted from the "
        "connection's opening or the end of its previous response; then 408 and close "
        "(slowloris guard).",
    )  # fmt: skip
    body_timeout_s: float = Field(
        default=60.0, gt=0.0, le=3600.0,
        description="Time (s) a client has to send the whole request body, counted from the end "
        "of its headers; then 408 and close, and the bytes buffered so far are released (slow "
        "upload guard). Allow for the largest body (max_body_bytes) at the slowest client link.",
    )  # fmt: skip
    keep_alive_timeout_s: float = Field(
        default=5.0, gt=0.0, le=600.0,
        description="An idle keep-alive connection is closed after this long (s).",
    )  # fmt: skip
    max_connections: int = Field(
        default=1000, ge=1, le=1_000_000,
        description="Open client connections at once; a connection beyond it gets 503 and is "
        "closed. Keep it below the process's file-descriptor limit (ulimit -n).",
    )  # fmt: skip
    max_aspect_ratio: float = Field(
        default=1000.0, ge=1.0,
        description="Longest side over shortest side an image may have; beyond it 422.",
    )  # fmt: skip
    max_boxes: int = Field(
        default=64, ge=1, le=4096, description="Most caller boxes one request may send."
    )
    api_keys: str | None = Field(
        default=None,
        description="API keys, 'name:key,name2:key2'. Set (or api_key_file): requests need "
        "'Authorization: Bearer KEY' or 'X-API-Key: KEY'. Metrics show the name, never the key.",
    )
    api_key_file: Path | None = Field(
        default=None,
        description="File of API keys, one 'name:key' per line ('#' comments); with api_keys, "
        "both sets count.",
    )
    auth_open_probes: bool = Field(
        default=True, description="With keys: /healthz and /readyz stay open (for orchestrators)."
    )
    auth_open_metrics: bool = Field(
        default=True, description="With keys: /metrics stays open (for Prometheus)."
    )
    cors_origins: str = Field(
        default="",
        description="Browser origins allowed by CORS, comma-separated ('*' for any); empty: no "
        "CORS headers (same-origin only).",
    )

    _api_key_table: dict[str, str] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _check_edge(self) -> EdgeSettings:
        if self.api_key_file is not None and not self.api_key_file.is_file():
            raise ValueError(
                f"api_key_file {str(self.api_key_file)!r} is not a file: create it or unset "
                "COLORIZE_API_KEY_FILE"
            )
        from service.core.api_keys import load_api_keys  # no torch, no app: just the key format

        # parsed once, here: a malformed entry refuses the start; the app uses the table
        self._api_key_table = load_api_keys(self.api_keys, self.api_key_file)
        if self.max_body_bytes > 1024**3:
            raise ValueError(
                f"max_body_bytes ({self.max_body_bytes}) is over 1 GiB: bodies are held in memory; "
                "set COLORIZE_MAX_BODY_BYTES to at most 1073741824"
            )
        return self

    def api_key_table(self) -> dict[str, str]:
        """Key name -> key from api_keys and api_key_file, as parsed at validation (empty: off)."""
        return dict(self._api_key_table)

    def cors_origin_list(self) -> list[str]:
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]


class RedisSettings(BaseSettings):
    """Redis mode (queue=redis): API replicas and GPU workers share one Redis
    (service/queues/redis): delivery, the result cache and worker liveness."""

    model_config = _CONFIG

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0", description="Redis server for queue=redis."
    )
    redis_prefix: str = Field(
        default="colorize", min_length=1,
        description="Key prefix of this deployment in Redis (stream <prefix>:jobs, "
        "<prefix>:reply:*, <prefix>:cache:*, <prefix>:dead). Two deployments on one Redis need "
        "two prefixes.",
    )  # fmt: skip
    redis_group: str = Field(
        default="workers", min_length=1,
        description="Consumer group the GPU workers read the job stream through.",
    )  # fmt: skip
    claim_idle_ms: int = Field(
        default=5000, ge=100, le=3_600_000,
        description="A job held this long (ms) by a worker that stopped answering (it died) is "
        "taken over by a live worker. Lower: faster recovery; live workers heartbeat their "
        "batches, so a slow batch is never taken from a live worker.",
    )  # fmt: skip
    max_deliveries: int = Field(
        default=3, ge=1, le=100,
        description="A job handed to workers more times than this (each holder died) goes to the "
        "dead-letter stream and its client gets 500 processing-failed.",
    )  # fmt: skip
    result_ttl_s: float = Field(
        default=60.0, gt=0.0, le=86_400.0,
        description="Lifetime (s) of a result waiting in Redis for its API replica.",
    )  # fmt: skip
    dead_letter_maxlen: int = Field(
        default=10_000, ge=1,
        description="Approximate cap on the dead-letter stream (oldest entries trimmed); each "
        "entry keeps the job's image for inspection.",
    )  # fmt: skip
    cache_enabled: bool = Field(
        default=True,
        description="Redis mode: answer a repeated request (same image bytes, options and model "
        "version) from the result cache without a GPU. Ignored with queue=memory.",
    )
    cache_ttl_s: int = Field(
        default=3600, ge=1, le=30 * 86_400,
        description="Lifetime (s) of a cached result. Memory is bounded by Redis maxmemory with "
        "a volatile-* eviction policy (see the README).",
    )  # fmt: skip
    cache_redis_url: str | None = Field(
        default=None,
        description="Separate Redis for the result cache (e.g. one with allkeys-lru); unset: the "
        "queue's Redis.",
    )
    worker_metrics_port: int = Field(
        default=9100,
        ge=0,
        le=65535,
        description="Port of a Redis worker's own /metrics (0: none).",
    )

    worker_heartbeat_s: float = Field(
        default=1.0, gt=0.0, le=60.0,
        description="Redis mode: how often (s) each worker tells Redis it is alive.",
    )  # fmt: skip
    worker_alive_s: float = Field(
        default=5.0, gt=0.0, le=600.0,
        description="Redis mode: a worker not heard from for this long (s) counts as gone; with "
        "none alive /readyz is 503 and requests get 503 no-workers at once.",
    )  # fmt: skip

    @model_validator(mode="after")
    def _check_liveness(self) -> RedisSettings:
        if self.worker_alive_s <= self.worker_heartbeat_s:
            raise ValueError(
                f"worker_alive_s ({self.worker_alive_s}) is not longer than worker_heartbeat_s "
                f"({self.worker_heartbeat_s}): live workers would count as gone; raise "
                "COLORIZE_WORKER_ALIVE_S"
            )
        return self


class BatchApiSettings(BaseSettings):
    """The batch API (docs/batches.md): where batch state and results live, what a submit may
    hold, how batch items share the engine with interactive requests, and webhooks."""

    model_config = _CONFIG

    state_dir: Path = Field(
        default=Path("state"),
        description="Folder of the embedded batch database (batches.sqlite3, memory mode) and of "
        "extracted archive uploads.",
    )
    batch_input_roots: str = Field(
        default="",
        description="Folders a manifest's source paths may name, comma-separated; empty: "
        "manifests are refused (archive uploads still work).",
    )
    batch_output_dir: Path = Field(
        default=Path("batch-output"),
        description="Root of batch results: <root>/<output_prefix or batch id>/ holds images/, "
        "output.jsonl and errors.jsonl.",
    )
    batch_expiry_s: float = Field(
        default=86_400.0, gt=0.0, le=30 * 86_400.0,
        description="A batch not finished this long (s) after its submission ends expired "
        "(results so far kept).",
    )  # fmt: skip
    batch_max_items: int = Field(
        default=100_000, ge=1, le=10_000_000, description="Most items one batch may hold."
    )
    batch_max_open_per_key: int = Field(
        default=10, ge=1, le=10_000,
        description="Batches one API key may have open (not yet ended) at once; beyond: 429.",
    )  # fmt: skip
    batch_max_open_items_per_key: int = Field(
        default=1_000_000, ge=1,
        description="Items one API key may have in open batches at once; beyond: 429.",
    )  # fmt: skip
    batch_max_upload_bytes: int = Field(
        default=4 * 1024**3, ge=1024,
        description="Largest POST /batches body (bytes, from Content-Length); larger: 413. "
        "Uploads are spooled to disk, never held in memory.",
    )  # fmt: skip
    archive_max_entries: int = Field(
        default=100_000, ge=1, description="Most members an uploaded archive may hold."
    )
    archive_max_total_bytes: int = Field(
        default=16 * 1024**3, ge=1024,
        description="Most bytes an uploaded archive may expand to (all members).",
    )  # fmt: skip
    archive_max_ratio: float = Field(
        default=200.0, ge=1.0,
        description="Largest expansion ratio (uncompressed over compressed) of an archive "
        "member, and of a compressed tar as a whole (zip-bomb guard).",
    )  # fmt: skip
    batch_in_flight: int = Field(
        default=2, ge=1, le=1024,
        description="Batch items submitted to the engine at once. Interactive /colorize requests "
        "wait behind at most this many batch items; raise it (e.g. to max_batch_size x "
        "max_concurrent_batches) for batch throughput on a GPU.",
    )  # fmt: skip
    batch_lease_s: float = Field(
        default=15.0, ge=1.0, le=3600.0,
        description="Redis mode: a scheduler holds a batch under a lease of this many seconds, "
        "renewed every third of it; a killed scheduler's batch is taken over by another API "
        "replica once its lease runs out (shorter: faster takeover, more Redis writes).",
    )  # fmt: skip
    batch_item_timeout_s: float = Field(
        default=600.0, gt=0.0, le=86_400.0,
        description="Deadline (s) of one batch item in the queue and on the device; a miss is "
        "retried twice, then the item's error line says deadline-exceeded.",
    )  # fmt: skip
    webhook_secret: str | None = Field(
        default=None,
        description="Standard Webhooks signing secret, whsec_<base64>. Unset: submits with a "
        "webhook_url are refused (422).",
    )
    webhook_allowed_hosts: str = Field(
        default="",
        description="Webhook destination hosts, comma-separated ('*': any public host). A host "
        "named here may be internal (loopback, private); '*' never allows internal addresses.",
    )
    webhook_max_attempts: int = Field(
        default=8, ge=1, le=50, description="Delivery attempts per webhook event."
    )
    webhook_backoff_s: float = Field(
        default=1.0, gt=0.0, le=3600.0,
        description="First retry delay (s); doubles per attempt, with full jitter, capped at "
        "300 s.",
    )  # fmt: skip
    webhook_timeout_s: float = Field(
        default=10.0, gt=0.0, le=300.0, description="Timeout (s) of one delivery attempt."
    )
    webhook_progress_interval_s: float = Field(
        default=10.0, ge=1.0, le=86_400.0,
        description="Least time (s) between two batch.progress events of one batch.",
    )  # fmt: skip

    @model_validator(mode="after")
    def _check_batches(self) -> BatchApiSettings:
        if self.webhook_secret is not None:
            import base64
            import binascii

            raw = self.webhook_secret.removeprefix("whsec_")
            try:
                decoded = base64.b64decode(raw + "==", validate=False)
            except (binascii.Error, ValueError):
                decoded = b""
            if not self.webhook_secret.startswith("whsec_") or len(decoded) < 16:
                raise ValueError(
                    "webhook_secret must be 'whsec_' followed by base64 of at least 16 bytes, "
                    "e.g. python -c \"import base64,os;print('whsec_'+base64.b64encode("
                    'os.urandom(32)).decode())"'
                )
        return self

    def input_roots(self) -> list[Path]:
        return [Path(p.strip()).resolve() for p in self.batch_input_roots.split(",") if p.strip()]

    def webhook_hosts(self) -> list[str]:
        return [h.strip().lower() for h in self.webhook_allowed_hosts.split(",") if h.strip()]


class ServiceSettings(
    BatchApiSettings, RedisSettings, BatchingSettings, EdgeSettings, ModelSettings
):
    """The HTTP service and its workers: every role's settings plus the queue choice.

    The bases' validators run model, edge, batching, Redis, then the checks across roles here.
    """

    queue: Literal["memory", "redis"] = Field(
        default="memory",
        description="memory: batch in this process; redis: submit jobs to Redis for GPU workers.",
    )

    @model_validator(mode="after")
    def _check_redis(self) -> ServiceSettings:
        if self.queue != "redis":
            return self
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"redis_url {self.redis_url!r} is not a Redis URL: set COLORIZE_REDIS_URL to "
                "redis://host:port/db"
            )
        if self.claim_idle_ms <= self.max_batch_delay_ms:
            raise ValueError(
                f"claim_idle_ms ({self.claim_idle_ms}) is not longer than max_batch_delay_ms "
                f"({self.max_batch_delay_ms}): workers would take over jobs still filling a live "
                "worker's batch; raise COLORIZE_CLAIM_IDLE_MS"
            )
        if self.claim_idle_ms / 1000.0 >= self.request_timeout_s:
            raise ValueError(
                f"claim_idle_ms ({self.claim_idle_ms}) is not shorter than request_timeout_s "
                f"({self.request_timeout_s} s): a dead worker's jobs would be taken over only "
                "after their clients gave up; lower COLORIZE_CLAIM_IDLE_MS"
            )
        return self

    def warmup_plan(self, device_type: str) -> tuple[list[int], int]:
        """Batch sizes to warm up and instances per image, on a ``cpu`` or ``cuda`` device."""
        if self.warmup_scope == "minimal" or (
            self.warmup_scope == "auto" and device_type != "cuda"
        ):
            return [1], min(1, self.instance_limit)
        return self.batch_buckets(), self.instance_limit

    def resolved_max_batch_size(self) -> int:
        """``max_batch_size``, or where unset the automatic size for this machine's device."""
        return self.max_batch_size_for(self.resolved_device())

    def batch_buckets(self) -> list[int]:
        """Batch sizes warmed up at start: powers of two below max_batch_size, and it."""
        largest = self.resolved_max_batch_size()
        sizes, size = [], 1
        while size < largest:
            sizes.append(size)
            size *= 2
        return [*sizes, largest]


def describe_validation_error(exc: ValidationError) -> str:
    """A start-up message: each bad value with its environment variable and how to fix it."""
    lines = ["invalid settings:"]
    for error in exc.errors():
        loc = ".".join(str(part) for part in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        if loc:
            value = error.get("input")
            field = ServiceSettings.model_fields.get(str(error["loc"][0]))
            hint = f" ({field.description})" if field is not None and field.description else ""
            lines.append(f"  COLORIZE_{loc.upper()}={value!r}: {message}{hint}")
        else:
            lines.append(f"  {message}")
    return "\n".join(lines)
