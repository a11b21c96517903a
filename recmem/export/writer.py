"""Write a serving bundle (the layout ``recmem/serving/bundle.py`` documents and loads).

The bundle is written into a temporary folder beside its destination and renamed into place, so a
reader never sees half a bundle. Its version names its content: the step, the row format and the
start of a SHA-256 over every file's checksum.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import recmem
from recmem.serving.bundle import BUNDLE_FORMAT, MANIFEST
from recmem.serving.lookup import FORMATS, QuantizedRows, lookup_from_tensors
from recmem.tables.base import ServingForm

_EXAMPLE_BATCH = 4  # not 0 or 1, which torch.export would specialise the batch size on


def export_dense(dense: torch.nn.Module, n_dense: int, n_sparse: int, width: int, folder: Path) -> dict[str, str]:
    """Save the dense part (dense [B, n_dense], pooled [B, F, D]) -> logits [B] into ``folder``.

    ``torch.export`` with a dynamic batch, as ``dense.pt2``; a module it cannot export goes to
    TorchScript as ``dense.ts`` (scripted, else traced and checked at other batch sizes).

    Returns:
        The manifest's ``dense`` entry: ``{"file", "format", "fallback_reason"?}``.
    """
    module = copy.deepcopy(getattr(dense, "module", dense)).cpu().float().eval()  # DDP wraps it on Ray
    example = (torch.randn(_EXAMPLE_BATCH, n_dense), torch.randn(_EXAMPLE_BATCH, n_sparse, width))
    batch = torch.export.Dim("batch", min=1, max=1 << 24)
    # torchrec's MLP asks torch.fx whether it is being traced, and torch logs a warning about that
    # question under torch.export: noise for the user of `recmem export`.
    quiet = logging.getLogger("torch.fx._symbolic_trace")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        program = torch.export.export(module, example, dynamic_shapes=({0: batch}, {0: batch}))
        torch.export.save(program, folder / "dense.pt2")
        return {"file": "dense.pt2", "format": "torch.export"}
    except Exception as e:  # torch.export fails in many ways on code it cannot trace
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    finally:
        quiet.setLevel(level)
    torch.jit.save(_torchscript(module, example), str(folder / "dense.ts"))
    return {"file": "dense.ts", "format": "torchscript", "fallback_reason": reason}


def _torchscript(module: torch.nn.Module, example: tuple[torch.Tensor, torch.Tensor]) -> torch.jit.ScriptModule:
    """``torch.jit.script``, else a trace checked to answer as the module at other batch sizes.

    Raises:
        RuntimeError: neither form answers as the module does.
    """
    try:
        return torch.jit.script(module)
    except Exception:  # torchrec's cross net indexes a ModuleList by a variable: not scriptable
        pass
    with torch.no_grad():
        traced = torch.jit.trace(module, example, check_trace=False)
        for batch in (1, 7):
            probe = (torch.randn(batch, *example[0].shape[1:]), torch.randn(batch, *example[1].shape[1:]))
            if not torch.allclose(traced(*probe), module(*probe), rtol=0, atol=1e-6):
                raise RuntimeError("the dense part exports neither by torch.export nor by TorchScript "
                                   "(its trace does not generalise over the batch size)")
    return traced


def write_bundle(out: str | Path, forms: list[ServingForm], kinds: list[str], dense: torch.nn.Module,
                 schema: dict[str, Any], fmt: str, info: dict[str, Any]) -> Path:
    """Write a bundle under ``out`` and return its folder ``out/<version>``.

    Args:
        out: the parent folder of versioned bundles.
        forms: one serving form per sparse feature, ``schema["sparse"]`` order.
        kinds: the table kind of each feature (recorded in the manifest).
        dense: the dense module.
        schema: ``{"label", "dense", "sparse"}`` field names.
        fmt: the row format, one of ``recmem.serving.lookup.FORMATS``.
        info: provenance for the manifest: ``step``, ``training_run``, ``checkpoint``,
            ``last_data_time``, ``sparse_strings`` ("hex" / "hash"), ``arch``, ``sharding``.

    Raises:
        ValueError: an unknown format, or forms that do not match the schema.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: one of {', '.join(FORMATS)}")
    if len(forms) != len(schema["sparse"]) or len(kinds) != len(forms):
        raise ValueError(f"{len(forms)} serving forms for {len(schema['sparse'])} sparse features")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".export-tmp-{os.getpid()}-{time.monotonic_ns()}"
    (tmp / "tables").mkdir(parents=True)
    try:
        tables = [_write_table(tmp, i, name, kind, form, fmt)
                  for i, (name, kind, form) in enumerate(zip(schema["sparse"], kinds, forms))]
        width = tables[0]["width"]
        dense_entry = export_dense(dense, len(schema["dense"]), len(schema["sparse"]), width, tmp)
        files = {str(p.relative_to(tmp)): _record(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        digest = hashlib.sha256("".join(f"{k}:{v['sha256']}" for k, v in sorted(files.items())).encode()).hexdigest()
        version = f"s{info.get('step', 0)}-{fmt}-{digest[:12]}"
        manifest = {
            "bundle_format": BUNDLE_FORMAT,
            "version": version,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "recmem_version": recmem.__version__,
            "torch_version": torch.__version__,
            "training_run": info.get("training_run"),
            "checkpoint": info.get("checkpoint"),
            "step": info.get("step"),
            "last_data_time": info.get("last_data_time"),
            "quantization": fmt,
            "schema": {"label": schema["label"], "dense": list(schema["dense"]), "sparse": list(schema["sparse"])},
            "inputs": {"dense_transform": "log(1 + max(x, 0)); null -> 0",
                       "sparse_strings": info.get("sparse_strings", "hex"), "missing_id": -1},
            "dense": {**dense_entry, "arch": info.get("arch")},
            "sharding": info.get("sharding"),
            "tables": tables,
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        final = out / version
        if final.exists():  # the same content exported before: keep that one
            shutil.rmtree(tmp)
            return final
        os.replace(tmp, final)
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_table(folder: Path, i: int, name: str, kind: str, form: ServingForm, fmt: str) -> dict[str, Any]:
    rows = QuantizedRows.quantize(form.tensors["rows"], fmt)
    arrays = {**{k: v for k, v in form.tensors.items() if k != "rows"}, **rows.tensors()}
    files = {}
    for array, tensor in arrays.items():
        rel = f"tables/{i}.{array}.npy"
        np.save(folder / rel, tensor.detach().contiguous().numpy(), allow_pickle=False)
        files[array] = rel
    width = lookup_from_tensors(form.lookup, form.tensors).width  # the output width (after any projection)
    return {"feature": name, "kind": kind, "lookup": form.lookup, "rows": len(rows), "width": width,
            "bytes": rows.nbytes() + sum(t.numel() * t.element_size() for k, t in arrays.items() if k not in rows.tensors()),
            "files": files}


def _record(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        return {"sha256": hashlib.file_digest(f, "sha256").hexdigest(), "bytes": path.stat().st_size}


def bundle_bytes(folder: Path) -> int:
    """Bytes of every file in a bundle folder."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
