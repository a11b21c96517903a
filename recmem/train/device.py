"""Where the dense part of a model runs (``train.device``), checked before any work starts.

Tables always live in host memory (fbgemm's CPU kernels, host-side ID maps); ``train.device: cuda``
moves the dense layers to a GPU, and under Ray each worker to its own GPU with NCCL for the dense
all-reduce (the tables keep exchanging over gloo).
"""

from __future__ import annotations

import warnings

import torch

from recmem.config import ConfigError, TrainConfig


def dense_device(cfg: TrainConfig, device: torch.device | None = None) -> torch.device:
    """The device of the dense layers; ``device`` is the one a launcher assigned (Ray's per-worker GPU).

    Warns when ``precision: bf16`` would run on a CPU without native bf16 matrix units (AVX512-BF16 or
    AMX): torch then falls back to a generic kernel, measured 12x slower than fp32 on an AVX2 CPU.

    Raises:
        ConfigError: ``train.device: cuda`` where this process sees no CUDA GPU.
    """
    if cfg.device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda, but this process sees no CUDA GPU "
                              "(torch.cuda.is_available() is False); use train.device=cpu")
        device = device or torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    if cfg.precision == "bf16" and device.type == "cpu" and not native_bf16:
        warnings.warn("train.precision=bf16 on a CPU without AVX512-BF16 or AMX: the dense layers will "
                      "run slower than in fp32 (measured 12x slower on AVX2); use train.precision=fp32",
                      stacklevel=2)
    return device
