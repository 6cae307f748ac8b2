"""Numeric precision of the networks, and the CPU probe behind ``precision=auto``.

* ``fp32``: the parity mode (matches the authors' code to float rounding; no TF32 on CUDA).
* ``fp16``: CUDA only in practice; weights and activations in half precision.
* ``bf16``: bfloat16 weights and activations on any device. On a CPU oneDNN runs bf16
  convolutions fast only where the CPU has native bf16 instructions (AMX or AVX512-BF16);
  elsewhere (e.g. AVX2-only CPUs) it emulates them and is several times *slower* than fp32.

``auto`` picks bf16 on CUDA devices of compute capability 8.0 or newer (Ampere, Hopper: bf16 has
fp32's range, so no overflow, at the same tensor-core rate as fp16), fp16 on older CUDA devices,
bf16 on a CPU with native bf16 and fp32 on any other CPU. The CUDA choice is made on that argument,
not measured: no GPU has run this code yet (docs/performance.md).
In every mode the fusion logits, their softmax, the weighted sum and the Lab conversion run in
float32 (see ``models/fusion.py``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

Precision = Literal["fp32", "fp16", "bf16"]
PrecisionSetting = Literal["auto", "fp32", "fp16", "bf16"]

DTYPES: dict[Precision, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}

CPUINFO = Path("/proc/cpuinfo")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
"""/proc/cpuinfo flags that mean native bf16 arithmetic (Intel AMX, AVX512-BF16 incl. AMD Zen 4)."""


@dataclass(frozen=True)
class CpuFeatures:
    """What the CPU offers for bf16, from torch's own probe and from /proc/cpuinfo."""

    capability: str  # torch.backends.cpu.get_cpu_capability(): AVX2, AVX512, ...
    amx: bool
    avx512_bf16: bool
    cpuinfo_flags: tuple[str, ...]  # the BF16_FLAGS found in /proc/cpuinfo (empty elsewhere)

    @property
    def native_bf16(self) -> bool:
        return self.amx or self.avx512_bf16

    def describe(self) -> dict[str, Any]:
        """For /info and the start-up log."""
        found = [
            name for name, has in (("AMX", self.amx), ("AVX512-BF16", self.avx512_bf16)) if has
        ]
        return {
            "capability": self.capability,
            "native_bf16": self.native_bf16,
            "bf16_instructions": found,
            "cpuinfo_bf16_flags": list(self.cpuinfo_flags),
        }


def _cpuinfo_flags() -> tuple[str, ...]:
    try:
        text = CPUINFO.read_text()
    except OSError:
        return ()
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return tuple(flag for flag in BF16_FLAGS if flag in flags)


def _torch_probe(name: str) -> bool:
    probe = getattr(torch.cpu, name, None)  # private helpers of torch.cpu (cpuinfo-based)
    try:
        return bool(probe()) if callable(probe) else False
    except RuntimeError:
        return False


@functools.cache
def probe_cpu() -> CpuFeatures:
    """The CPU's bf16 support: torch's cpuinfo probe or the kernel's flags, either suffices."""
    flags = _cpuinfo_flags()
    return CpuFeatures(
        capability=torch.backends.cpu.get_cpu_capability(),
        amx=_torch_probe("_is_amx_tile_supported") or "amx_bf16" in flags,
        avx512_bf16=_torch_probe("_is_avx512_bf16_supported") or "avx512_bf16" in flags,
        cpuinfo_flags=flags,
    )


SETTINGS: tuple[PrecisionSetting, ...] = ("auto", "fp32", "fp16", "bf16")

BF16_CUDA_MAJOR = 8
"""First CUDA compute capability (Ampere) with bf16 tensor cores at fp16's rate."""


def cuda_auto_precision(capability: tuple[int, int] | None) -> Precision:
    """``auto`` on CUDA: bf16 from compute capability 8.0 on (or when unknown), else fp16."""
    if capability is None or capability[0] >= BF16_CUDA_MAJOR:
        return "bf16"
    return "fp16"


def _cuda_capability(device: torch.device) -> tuple[int, int] | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def resolve_precision(setting: PrecisionSetting | str, device: torch.device | str) -> Precision:
    """``auto``: bf16 on Ampere+ CUDA (fp16 before), bf16 on a CPU with native bf16, else fp32.

    Anything else is a ``ValueError`` naming the valid values.
    """
    if setting not in SETTINGS:
        valid = ", ".join(repr(name) for name in SETTINGS)
        raise ValueError(f"precision must be one of {valid}, got {setting!r}")
    if setting != "auto":
        return setting  # one of DTYPES' keys, checked above
    kind = torch.device(device).type
    if kind == "cuda":
        return cuda_auto_precision(_cuda_capability(torch.device(device)))
    if kind == "cpu" and probe_cpu().native_bf16:
        return "bf16"
    return "fp32"


def precision_reason(setting: PrecisionSetting, device: torch.device | str) -> str:
    """One line for the start-up log: the precision in use and why ``auto`` chose it."""
    precision = resolve_precision(setting, device)
    if setting != "auto":
        return f"precision {precision} (set explicitly)"
    kind = torch.device(device).type
    if kind == "cuda":
        capability = _cuda_capability(torch.device(device))
        shown = "unknown" if capability is None else f"{capability[0]}.{capability[1]}"
        return f"precision {precision} (auto: CUDA compute capability {shown})"
    cpu = probe_cpu()
    found = ", ".join(cpu.describe()["bf16_instructions"]) or "neither AMX nor AVX512-BF16"
    return f"precision {precision} (auto: CPU {cpu.capability}, {found})"
