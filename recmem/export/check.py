"""Every export checks itself: the bundle, loaded as a server loads it, scores the first validation
rows, and its logits are compared with the trained model's own forward pass on the same rows.

The largest difference is recorded in the manifest (``export_check``, beside the files, not one of
them); an fp32 bundle further than ``FP32_TOLERANCE`` from its model fails the export, since a
server would then answer differently from the trainer. fp16 and int8 bundles differ by design; their
difference is recorded only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from recmem.config import Config
from recmem.serving.bundle import MANIFEST, load_bundle

PROBE_ROWS = 256
FP32_TOLERANCE = 1e-5


def probe_batch(cfg: Config, rows: int = PROBE_ROWS) -> Any | None:
    """The first ``rows`` rows of the validation split as a Batch (None when there is no split)."""
    from recmem.data.dataset import iter_batches

    try:
        return next(iter_batches(Path(cfg.data.root), "valid", cfg.data.schema, rows, drop_last=False), None)
    except (FileNotFoundError, OSError):
        return None


def check_bundle(folder: Path, batch: Any, expected: torch.Tensor, sparse: list[str]) -> float:
    """Load the bundle in ``folder``, score ``batch``, compare with ``expected`` logits [B], record.

    Returns:
        The largest absolute logit difference.

    Raises:
        RuntimeError: an fp32 bundle differs by more than ``FP32_TOLERANCE`` (it is removed).
    """
    bundle = load_bundle(folder)
    kjt = batch.sparse_features
    got = bundle.logits(batch.dense_features, [kjt[f].values() for f in sparse],
                        [kjt[f].lengths().to(torch.int64) for f in sparse])
    diff = float((got - expected.to(torch.float32)).abs().max()) if len(got) else 0.0
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["export_check"] = {"split": "valid", "rows": len(got), "max_abs_logit_diff": diff}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if manifest["quantization"] == "fp32" and diff > FP32_TOLERANCE:
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(f"the exported bundle {folder} answers up to {diff:.3g} away from the trained model "
                           f"(logits, {len(got)} validation rows; allowed {FP32_TOLERANCE:g})")
    return diff
