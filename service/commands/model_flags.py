"""The model flags shared by ``colorize``, ``serve`` and ``worker``; each overrides its env var."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

if TYPE_CHECKING:
    from service.core.tracing import TracingConfig
    from service.settings import ServiceSettings


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model (each overrides its COLORIZE_* variable)")
    group.add_argument("--weights-dir", type=Path, metavar="DIR",
                       help="every model's weights: DIR/<model name>/<official file> "
                       "[COLORIZE_WEIGHTS_DIR, default weights]")  # fmt: skip
    group.add_argument("--checkpoints", type=Path, help="instcolor: official folder or MMagic "
                       "file [COLORIZE_CHECKPOINTS, default <weights dir>/checkpoints]")  # fmt: skip
    detector = group.add_mutually_exclusive_group()
    detector.add_argument("--detector-weights", type=Path,
                          help="instcolor: torchvision Mask R-CNN weights "
                          "[COLORIZE_DETECTOR_WEIGHTS, default under the weights dir]")  # fmt: skip
    detector.add_argument("--no-detector", action="store_true",
                          help="full-image colorization only (unless boxes are supplied)")  # fmt: skip
    group.add_argument("--detector-version", choices=["v1", "v2"],
                       help="Mask R-CNN ResNet-50-FPN v1 or v2 [COLORIZE_DETECTOR_VERSION]")  # fmt: skip
    group.add_argument("--device", help="auto, cpu, cuda or cuda:N [COLORIZE_DEVICE]")
    group.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"],
                       help="[COLORIZE_PRECISION] auto: fp16 on CUDA, bf16 on a CPU with AMX or "
                       "AVX512-BF16, else fp32 (docs/performance.md)")  # fmt: skip
    group.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help="NHWC memory format [COLORIZE_CHANNELS_LAST, default on]")  # fmt: skip


def add_tracing_arguments(parser: argparse.ArgumentParser, default_service_name: str) -> None:
    """``--otlp-endpoint`` and ``--otlp-service-name``, as text-embeddings-inference has them."""
    group = parser.add_argument_group("tracing (off unless configured; docs/tracing.md)")
    group.add_argument("--otlp-endpoint", metavar="URL",
                       help="OpenTelemetry collector to send traces to over OTLP, e.g. "
                       "http://localhost:4318 [OTEL_EXPORTER_OTLP_ENDPOINT; "
                       "OTEL_TRACES_EXPORTER=console prints spans on stdout]")  # fmt: skip
    group.add_argument("--otlp-service-name", metavar="NAME",
                       help=f"service.name of the spans [OTEL_SERVICE_NAME, default "
                       f"{default_service_name}]")  # fmt: skip


def tracing_config(args: argparse.Namespace, default_service_name: str) -> TracingConfig | None:
    """The ``TracingConfig`` of the environment and the tracing flags (None: tracing off);
    raises ``TracingConfigError`` on a bad value."""
    import os

    from service.core.tracing import TracingConfig

    return TracingConfig.from_env(
        os.environ,
        default_service_name=default_service_name,
        otlp_endpoint=getattr(args, "otlp_endpoint", None),
        service_name=getattr(args, "otlp_service_name", None),
    )


def add_models_argument(parser: argparse.ArgumentParser) -> None:
    """``--models a,b`` of serve and worker (the first is the default model)."""
    parser.add_argument("--models", metavar="A,B",
                        help="models to load, comma-separated, the first the default of POST "
                        "/colorize (names: docs/models.md) [COLORIZE_MODELS, default instcolor]")  # fmt: skip


def add_model_choice(parser: argparse.ArgumentParser) -> None:
    """``--model NAME`` of colorize and evaluate."""
    parser.add_argument("--model", dest="models", metavar="NAME",
                        help="the model to run: instcolor (default), zhang-eccv16, "
                        "zhang-siggraph17, ... (docs/models.md) [COLORIZE_MODELS]")  # fmt: skip


def model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Settings fields given on the command line (absent flags leave the environment's value)."""
    overrides: dict[str, Any] = {}
    for name in (
        "weights_dir", "models", "checkpoints", "detector_weights", "detector_version", "device",
        "precision", "channels_last",
    ):  # fmt: skip
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    if "detector_weights" in overrides:
        overrides["detector"] = True
    if getattr(args, "no_detector", False):
        overrides["detector"] = False
    return overrides


def settings_from_args(
    args: argparse.Namespace, flags: tuple[str, ...], **fixed: Any
) -> ServiceSettings | None:
    """Settings from the environment, overridden by the model flags, ``flags`` and ``fixed``.

    On a bad value, prints which variable is wrong and how to fix it, and returns None.
    """
    from service.settings import ServiceSettings, describe_validation_error

    overrides = model_overrides(args)
    overrides.update({n: getattr(args, n) for n in flags if getattr(args, n, None) is not None})
    overrides.update(fixed)
    try:
        return ServiceSettings(**overrides)
    except ValidationError as exc:
        sys.stderr.write(describe_validation_error(exc) + "\n")
        return None
