"""Where the network runs and in which precision: `train.device` and `train.precision` (and
`mlc eval` / `mlc predict`'s --device and --precision) resolved to a torch device and an
autocast setting.

``auto`` device: the GPU when torch sees one (under torchrun each rank takes cuda:LOCAL_RANK),
else the CPU. ``auto`` precision:

- CUDA: bf16 autocast where the GPU has bf16 (Ampere and later), else fp16 autocast with a
  gradient scaler;
- CPU: bf16 autocast only on an instruction set whose bf16 training was measured to train as
  well as fp32 and to make the demo faster end to end (``CPU_AUTO_BF16``), else fp32.

Parameters, optimizer state and the loss stay fp32 in every mode: autocast runs the
convolutions and matrix products in the low precision and keeps reductions in fp32.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mlc.config import PRECISIONS, device_problem

# CPU bf16 instruction sets, best first, as /proc/cpuinfo names them: AMX tiles (Sapphire
# Rapids and later) and AVX512-BF16 (Cooper Lake, Zen 4 and later).
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")

# Does `precision: auto` choose bf16 autocast on a CPU with this instruction set? Only where
# the demo (`mlc demo`, fp32 and bf16 side by side in one run) reached a fwMAP@100 inside the
# fp32 run's 95% bootstrap interval AND finished faster end to end: `python -m
# benchmarks.bench_precision`, docs/benchmarks.md. AVX512-BF16 (AMD EPYC, 2 cores): 0.9585
# against fp32's 0.9620 [0.9563, 0.9675], 1.08x faster. AMX: not measured.
CPU_AUTO_BF16 = {"amx_bf16": False, "avx512_bf16": True}


class DeviceError(ValueError):
    """A device or precision this machine cannot run; the message says what it can."""


@dataclass(frozen=True)
class Precision:
    """A resolved precision: ``name`` fp32 | bf16 | fp16, and why (``how``: "set" when given,
    else what ``auto`` found)."""

    name: str
    how: str = "set"

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype, None for fp32 (no autocast)."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    @property
    def scaled(self) -> bool:
        """Whether training needs a gradient scaler (fp16: its small range underflows)."""
        return self.name == "fp16"

    def autocast(self, device: torch.device):
        """The context the forward pass runs in (a no-op for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)

    def __str__(self) -> str:
        return self.name if self.how == "set" else f"{self.name} ({self.how})"


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's instruction-set flags (empty where /proc/cpuinfo is not there)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def cpu_bf16_isa(flags: set[str] | None = None) -> str | None:
    """The best bf16 instruction set of this CPU (a CPU_BF16_FLAGS name), or None."""
    flags = cpu_flags() if flags is None else flags
    return next((f for f in CPU_BF16_FLAGS if f in flags), None)


def cuda_bf16() -> bool:
    """Whether the current GPU computes in bf16 natively (compute capability >= 8.0)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def resolve_device(spec: str = "auto", local_rank: int | None = None) -> torch.device:
    """The torch device of ``spec``. Under torchrun (``local_rank`` given) ``auto`` and ``cuda``
    are cuda:LOCAL_RANK, one GPU per process."""
    problem = device_problem(spec)
    if problem:
        raise DeviceError(f"device {problem}")
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"device {spec}: torch sees no CUDA GPU (torch {torch.__version__}, "
            f"{'a CPU build' if torch.version.cuda is None else 'CUDA ' + torch.version.cuda}); "
            "use device cpu or auto"
        )
    if spec in ("auto", "cuda"):
        index = local_rank or 0
        if index >= torch.cuda.device_count():
            raise DeviceError(
                f"process LOCAL_RANK={index} has no GPU of its own (torch sees "
                f"{torch.cuda.device_count()}): start one process per GPU, or use device cpu"
            )
        return torch.device("cuda", index)
    index = int(spec.split(":")[1])
    if local_rank is not None:
        raise DeviceError(
            f"device {spec} under torchrun: each process takes cuda:LOCAL_RANK; use cuda or auto"
        )
    if index >= torch.cuda.device_count():
        raise DeviceError(f"device {spec}: torch sees {torch.cuda.device_count()} GPU(s)")
    return torch.device("cuda", index)


def resolve_precision(
    spec: str, device: torch.device, flags: set[str] | None = None, training: bool = True
) -> Precision:
    """The Precision of ``spec`` (auto, fp32, bf16, fp16) on ``device``; DeviceError for fp16
    on a CPU (no gradient scaler there, and no fast fp16 kernels). Inference (``training``
    False: `mlc eval`, `mlc predict`, `mlc.load`) on a CPU resolves ``auto`` to fp32: CPU bf16
    kernels round differently with the batch's shape, and an evaluation's scores must not
    depend on its batching or process count (tested); CPU_AUTO_BF16 was measured for
    training."""
    if spec not in PRECISIONS:
        raise DeviceError(f"precision must be one of {', '.join(PRECISIONS)}, got {spec!r}")
    if device.type == "cuda":
        if spec != "auto":
            return Precision(spec)
        if cuda_bf16():
            return Precision("bf16", "auto: CUDA with bf16")
        return Precision("fp16", "auto: CUDA without bf16, gradient scaler")
    if spec == "fp16":
        raise DeviceError("precision fp16 runs on CUDA only: use bf16 or fp32 on a CPU")
    if spec != "auto":
        return Precision(spec)
    if not training:
        return Precision("fp32", "auto: inference on a CPU, exact whatever the batching")
    isa = cpu_bf16_isa(flags)
    if isa is None:
        return Precision("fp32", "auto: no bf16 instruction set")
    if CPU_AUTO_BF16.get(isa):
        return Precision("bf16", f"auto: {isa}")
    return Precision("fp32", f"auto: {isa} not measured to train faster as well")


def local_rank() -> int | None:
    """torchrun's LOCAL_RANK of this process, None outside torchrun."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        return int(os.environ.get("LOCAL_RANK", 0))
    return None
