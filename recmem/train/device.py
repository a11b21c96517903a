"""Where the dense part of a model runs (``train.device``) and in which precision (``train.precision``),
both settled before any work starts.

Tables always live in host memory (fbgemm's CPU kernels, host-side ID maps); ``train.device: cuda``
moves the dense layers to a GPU, and under Ray each worker to its own GPU with NCCL for the dense
all-reduce (the tables keep exchanging over gloo). ``train.precision: auto`` runs the dense layers
under bf16 autocast only where the device computes bf16 natively; :func:`dense_precision` is the one
place that decides.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch

from recmem.config import ConfigError, TrainConfig

Precision = Literal["fp32", "bf16"]
"""A resolved ``train.precision``: what the dense layers actually run in."""
_NAMES = {"cpu": "CPU", "cuda": "GPU"}


def dense_device(cfg: TrainConfig, device: torch.device | None = None) -> torch.device:
    """The device of the dense layers; ``device`` is the one a launcher assigned (Ray's per-worker GPU).

    Raises:
        ConfigError: ``train.device: cuda`` where this process sees no CUDA GPU.
    """
    if cfg.device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda, but this process sees no CUDA GPU "
                              "(torch.cuda.is_available() is False); use train.device=cpu")
        return device or torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matrix products natively: a CUDA GPU that supports bf16, or a CPU
    with AVX512-BF16 or AMX (without them torch falls back to a generic kernel, measured 12x slower
    than fp32 on an AVX2 CPU)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def dense_precision(cfg: TrainConfig, device: torch.device) -> Precision:
    """What ``train.precision`` means on ``device``: ``auto`` is bf16 where :func:`native_bf16`, else fp32.

    Warns when an explicit ``bf16`` will run without native bf16.
    """
    native = native_bf16(device)
    if cfg.precision == "auto":
        return "bf16" if native else "fp32"
    if cfg.precision == "bf16" and not native:
        warnings.warn(f"train.precision=bf16 on a {device.type} without native bf16 (AVX512-BF16 or AMX on a "
                      "CPU): the dense layers will run slower than in fp32 (measured 12x slower on AVX2); "
                      "use train.precision=auto or fp32", stacklevel=2)
    return cfg.precision


def precision_note(cfg: TrainConfig, used: Precision) -> str:
    """One line saying which precision the dense layers took, and why (for the run's output)."""
    if cfg.precision != "auto":
        return f"recmem: dense layers in {used} (train.precision={cfg.precision})"
    why = "runs bf16 natively" if used == "bf16" else "has no native bf16"
    return f"recmem: dense layers in {used} (train.precision=auto: this {_NAMES[cfg.device]} {why})"
