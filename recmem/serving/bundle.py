"""Load a serving bundle and score raw rows with it: torch, numpy and the standard library only.

A bundle is a directory ``<model version>/`` written by ``recmem export``::

    manifest.json          schema, tables, version, provenance, and the SHA-256 of every other file
    dense.pt2              the dense part, ``torch.export`` with a dynamic batch (or dense.ts, TorchScript):
                           (dense [B, n_dense] float32, pooled [B, F, D] float32) -> logits [B]
    tables/<i>.<array>.npy one table per sparse feature i (schema order): ``keys`` (int64, keyed
                           lookups), ``rows`` (float32 / float16 / uint8), ``scale`` and ``bias``
                           (float32, int8 rows), ``default`` (float32 [d], keyed lookups),
                           ``projection`` (float32 [D, d], tables storing rows narrower than D)

:func:`load_bundle` trusts none of it: every file's size and SHA-256 must match the manifest before
it is read, arrays load with ``allow_pickle=False``, the ``.pt2`` archive is refused if any part of
it would be unpickled, and shapes and dtypes are checked against the manifest. Anything wrong is a
:class:`BundleError` naming the file.

Unseen IDs get their kind's default: ``full`` its out-of-vocabulary row, ``collisionless`` nothing
(a zero row: an ID without a row pools to nothing in training too), ``hash`` has no unseen IDs (every
ID hashes to a row). A missing sparse value is the ID -1, which the model saw in training like any ID.

Deltas (:meth:`Bundle.apply_delta`) change rows of a loaded bundle; the online loop produces them::

    {"base_version": "<the version this delta applies to>",
     "version": "<the version after it>",
     "tables": {"<feature>": {"ids": [int, ...],            # raw IDs (keyed kinds: full,
                                                            #   collisionless) or row numbers in
                                                            #   [0, n) (hash: id mod n)
                              "rows": [[float] * D, ...],   # one fp32 row per id, quantized as the bundle
                              "deleted": [int, ...],        # IDs to drop (keyed kinds only): they
                                                            #   answer the default from then on
                              "replace": false}},           # true: ids are all the table's IDs,
                                                            #   every other one is dropped (a full
                                                            #   resend; keyed kinds)
     "dense": {"<parameter name>": [[float, ...], ...]}}    # optional: new dense values, same shapes

A delta whose ``base_version`` is not this bundle's version is a :class:`DeltaConflict`; one that
is malformed (wrong widths, unknown features, non-finite values, duplicate IDs) an :class:`InputError`.
Either way the bundle is unchanged: ``apply_delta`` builds a new one.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recmem.serving.inputs import InputError, parse_rows
from recmem.serving.lookup import FORMATS, LOOKUPS, Lookup, lookup_from_tensors

__all__ = ["Bundle", "BundleError", "DeltaConflict", "InputError", "load_bundle"]

MANIFEST = "manifest.json"
BUNDLE_FORMAT = 1
"""The layout version this loader reads (``manifest["bundle_format"]``)."""
_MAX_MANIFEST_BYTES = 64 << 20
_ARRAY_DTYPES = {"keys": {np.int64}, "rows": {np.float32, np.float16, np.uint8}, "scale": {np.float32},
                 "bias": {np.float32}, "default": {np.float32}, "projection": {np.float32},
                 "params": {np.int64}}


class BundleError(ValueError):
    """A bundle that cannot be trusted or read; the message names the bundle and the file."""


class DeltaConflict(ValueError):
    """A delta made for another version than the bundle's (its ``base_version`` does not match)."""


class Bundle:
    """A loaded model: tables as lookups, the dense part, and the manifest describing them.

    Immutable: :meth:`apply_delta` returns a new bundle, so a server can keep answering from this
    one while it swaps. Safe to call from several threads.

    Args:
        manifest: the (checked) manifest.
        lookups: one per sparse feature, schema order.
        dense: the dense module (dense [B, n_dense], pooled [B, F, D]) -> logits [B].
    """

    def __init__(self, manifest: dict[str, Any], lookups: list[Lookup], dense: torch.nn.Module) -> None:
        self.manifest = manifest
        self._lookups = list(lookups)
        self._dense = dense
        schema = manifest["schema"]
        self._dense_names, self._sparse_names = list(schema["dense"]), list(schema["sparse"])

    @property
    def version(self) -> str:
        """The model version (the bundle's folder name; a delta's ``version`` after one)."""
        return self.manifest["version"]

    @property
    def feature_names(self) -> list[str]:
        """Sparse features in schema order."""
        return list(self._sparse_names)

    def predict(self, rows: list[dict[str, Any]], max_rows: int | None = None, fill_missing: bool = False,
                max_bag: int = 1024) -> list[float]:
        """Click probabilities of raw feature rows (see ``recmem/serving/inputs.py`` for the values).

        Args:
            rows: ``[{"I1": 3, "C1": "68fd1e64", ...}, ...]``: every dense and sparse field of the
                schema (null for a missing value); the label field may be present and is ignored.
            max_rows: refuse more rows than this.
            fill_missing: treat a field absent from a row as null instead of refusing the row.
            max_bag: most IDs in one multi-hot bag.

        Raises:
            InputError: naming the row index and the field.
        """
        schema = self.manifest["schema"]
        dense, values, lengths = parse_rows(rows, self._dense_names, self._sparse_names, schema["label"],
                                            self.manifest["inputs"]["sparse_strings"], max_rows, max_bag,
                                            fill_missing)
        if not rows:
            return []
        return self.predict_tensors(dense, values, lengths).tolist()

    def predict_tensors(self, dense: torch.Tensor, values: list[torch.Tensor], lengths: list[torch.Tensor]) -> torch.Tensor:
        """Probabilities [B] of model inputs as tensors: sigmoid of :meth:`logits`."""
        return torch.sigmoid(self.logits(dense, values, lengths))

    def logits(self, dense: torch.Tensor, values: list[torch.Tensor], lengths: list[torch.Tensor]) -> torch.Tensor:
        """The trainer's forward pass on plain tensors.

        Args:
            dense: [B, n_dense] float32, already transformed (what the Parquet holds).
            values: per sparse feature (schema order), [N_f] int64 raw IDs.
            lengths: per sparse feature, [B] int64 bag sizes (sum N_f).

        Returns:
            [B] float32 logits.

        Raises:
            InputError: shapes, dtypes or lengths that do not fit the schema.
        """
        batch = _check_tensors(dense, values, lengths, len(self._dense_names), len(self._sparse_names))
        with torch.inference_mode():
            pooled = torch.stack([t(v, n) for t, v, n in zip(self._lookups, values, lengths)], dim=1)  # [B, F, D]
            if batch == 0:
                return torch.zeros(0)
            return self._dense(dense.to(torch.float32), pooled).reshape(batch).to(torch.float32)

    def nbytes(self) -> dict[str, int]:
        """Bytes held in memory: ``tables`` (rows, keys, scales) and ``dense`` (parameters and buffers)."""
        dense = sum(t.numel() * t.element_size() for t in (*self._dense.parameters(), *self._dense.buffers()))
        return {"tables": sum(t.nbytes() for t in self._lookups), "dense": dense}

    def full_delta(self, base_version: str) -> dict[str, Any]:
        """A delta that turns a bundle of version ``base_version`` (same schema and widths) into this
        one: every table's rows (keyed tables with ``replace``) and every dense weight. What a loop
        sends to roll a server back to this bundle.

        Raises:
            ValueError: a table whose lookup a delta cannot rebuild (only keyed and modulo ones).
        """
        tables = {}
        for name, lookup in zip(self._sparse_names, self._lookups):
            if lookup.kind not in ("keyed", "modulo"):
                raise ValueError(f"feature {name!r}: a {lookup.kind} lookup cannot be sent as a delta")
            rows = lookup.rows.dense()  # [n, d] float32
            ids = lookup.keys if lookup.kind == "keyed" else torch.arange(len(rows))
            tables[name] = {"ids": ids.tolist(), "rows": rows.tolist(), "replace": lookup.kind == "keyed"}
        dense = {k: v.tolist() for k, v in self._dense.state_dict().items() if v.is_floating_point()}
        return {"base_version": base_version, "version": self.version, "tables": tables, "dense": dense}

    def apply_delta(self, delta: dict[str, Any]) -> "Bundle":
        """A new bundle with ``delta``'s rows (format in the module docstring); this one is unchanged.

        Raises:
            DeltaConflict: ``delta["base_version"]`` is not :attr:`version`.
            InputError: a malformed delta, naming the feature or parameter at fault.
        """
        if not isinstance(delta, dict):
            raise InputError(f"a delta is an object, got {type(delta).__name__}")
        unknown = sorted(set(delta) - {"base_version", "version", "tables", "dense"})
        if unknown:
            raise InputError(f"delta: unknown key {unknown[0]!r}")
        base, version = delta.get("base_version"), delta.get("version")
        if not isinstance(base, str) or not isinstance(version, str) or not version or len(version) > 200:
            raise InputError("delta: base_version and version must be non-empty strings")
        if base != self.version:
            raise DeltaConflict(f"delta for base version {base[:200]!r}, but this model is {self.version!r}")
        tables = delta.get("tables") or {}
        if not isinstance(tables, dict):
            raise InputError("delta: tables must be an object {feature: {ids, rows, deleted}}")
        lookups = list(self._lookups)
        for name, change in tables.items():
            if name not in self._sparse_names:
                raise InputError(f"delta: tables: unknown feature {str(name)[:64]!r}")
            f = self._sparse_names.index(name)
            lookups[f] = _changed_lookup(lookups[f], change, f"delta: tables.{name}")
        dense = _changed_dense(self._dense, delta.get("dense"))
        manifest = copy.deepcopy(self.manifest)
        manifest.update(version=version, base_version=base)
        for entry, lookup in zip(manifest["tables"], lookups):
            entry["rows"] = len(lookup.rows)
        return Bundle(manifest, lookups, dense)


def _check_tensors(dense: Any, values: Any, lengths: Any, n_dense: int, n_sparse: int) -> int:
    """B, after checking the inputs of :meth:`Bundle.logits`."""
    if not isinstance(dense, torch.Tensor) or dense.dim() != 2 or dense.shape[1] != n_dense:
        raise InputError(f"dense must be a [B, {n_dense}] tensor")
    if not dense.is_floating_point() or not bool(torch.isfinite(dense).all()):
        raise InputError("dense must hold finite floats")
    batch = int(dense.shape[0])
    if not isinstance(values, (list, tuple)) or not isinstance(lengths, (list, tuple)) \
            or len(values) != n_sparse or len(lengths) != n_sparse:
        raise InputError(f"values and lengths must be lists of {n_sparse} tensors (one per sparse feature)")
    for f, (v, n) in enumerate(zip(values, lengths)):
        if not isinstance(v, torch.Tensor) or v.dtype != torch.int64 or v.dim() != 1:
            raise InputError(f"values[{f}] must be a 1-D int64 tensor")
        if not isinstance(n, torch.Tensor) or n.dtype != torch.int64 or n.shape != (batch,):
            raise InputError(f"lengths[{f}] must be an int64 tensor of shape [{batch}]")
        if batch and (bool((n < 0).any()) or int(n.sum()) != v.shape[0]):
            raise InputError(f"lengths[{f}] must be >= 0 and sum to len(values[{f}]) = {v.shape[0]}")
        if not batch and v.shape[0]:
            raise InputError(f"values[{f}] holds IDs for no rows")
    return batch


def _int_list(x: Any, where: str) -> torch.Tensor:
    if not isinstance(x, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in x):
        raise InputError(f"{where} must be a list of integers")
    if any(not -(2**63) <= i < 2**63 for i in x):
        raise InputError(f"{where}: an ID is out of the int64 range")
    t = torch.tensor(x, dtype=torch.int64)
    if torch.unique(t).numel() != t.numel():
        raise InputError(f"{where}: an ID is given twice")
    return t


def _float_rows(x: Any, count: int, width: int, where: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        rows = x.detach().to(torch.float32)
    elif isinstance(x, list) and all(isinstance(r, list) and len(r) == width for r in x) \
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for r in x for v in r):
        try:
            rows = torch.tensor(x, dtype=torch.float32).reshape(len(x), width)
        except (OverflowError, RuntimeError):
            raise InputError(f"{where}: a value is out of range") from None
    else:
        raise InputError(f"{where} must be a list of {count} rows of {width} numbers")
    if rows.shape != (count, width):
        raise InputError(f"{where} must be {count} rows of {width} numbers, got shape {tuple(rows.shape)}")
    if not bool(torch.isfinite(rows).all()):
        raise InputError(f"{where}: a value is not finite")
    return rows


def _changed_lookup(lookup: Lookup, change: Any, where: str) -> Lookup:
    if not isinstance(change, dict) or set(change) - {"ids", "rows", "deleted", "replace"}:
        raise InputError(f"{where} must be an object with ids, rows, deleted and replace")
    ids = _int_list(change.get("ids", []), f"{where}.ids")
    rows = _float_rows(change.get("rows", []), len(ids), lookup.rows.width, f"{where}.rows")  # stored width
    deleted = _int_list(change.get("deleted", []), f"{where}.deleted")
    replace = change.get("replace", False)
    if not isinstance(replace, bool) or (replace and deleted.numel()):
        raise InputError(f"{where}.replace must be true or false, and true comes without deleted")
    if replace and lookup.kind == "keyed":  # every ID the delta does not list goes
        deleted = lookup.keys[~torch.isin(lookup.keys, ids)]
    if bool(torch.isin(ids, deleted).any()):
        raise InputError(f"{where}: an ID is both updated and deleted")
    if lookup.kind != "keyed":
        if deleted.numel():
            raise InputError(f"{where}.deleted: a {lookup.kind} table has no IDs to delete (send its rows)")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(lookup.rows)):
            raise InputError(f"{where}.ids: a {lookup.kind} table's ids are row numbers in [0, {len(lookup.rows)})")
    return lookup.with_rows(ids, rows, deleted)


def _changed_dense(dense: torch.nn.Module, change: Any) -> torch.nn.Module:
    if change is None:
        return dense
    if not isinstance(change, dict):
        raise InputError("delta: dense must be an object {parameter name: values}")
    current = dict(dense.state_dict())
    new = {}
    for name, value in change.items():
        if name not in current:
            raise InputError(f"delta: dense: unknown parameter {str(name)[:100]!r}")
        try:
            t = torch.as_tensor(value, dtype=torch.float32) if not isinstance(value, torch.Tensor) else value.detach()
        except (TypeError, ValueError, OverflowError, RuntimeError):
            raise InputError(f"delta: dense.{name}: not an array of numbers") from None
        if t.shape != current[name].shape:
            raise InputError(f"delta: dense.{name}: shape {tuple(t.shape)}, the model's is {tuple(current[name].shape)}")
        if not bool(torch.isfinite(t.to(torch.float32)).all()):
            raise InputError(f"delta: dense.{name}: a value is not finite")
        new[name] = t.to(current[name].dtype)
    changed = copy.deepcopy(dense)
    with torch.no_grad():
        for name, value in changed.state_dict(keep_vars=True).items():
            if name in new:
                value.copy_(new[name])
    return changed


def load_bundle(path: str | Path) -> Bundle:
    """Load and verify the bundle in the directory ``path``.

    Raises:
        BundleError: the manifest is missing or malformed, a file is missing, altered (size or
            SHA-256), outside the bundle, of the wrong dtype or shape, or would unpickle anything.
    """
    root = Path(path)
    manifest = _read_manifest(root)
    files = _verified_files(root, manifest)
    lookups = [_load_table(root, files, entry, i, manifest) for i, entry in enumerate(manifest["tables"])]
    dense = _load_dense(root, files, manifest)
    return Bundle(manifest, lookups, dense)


def _fail(root: Path, name: str, why: str) -> BundleError:
    return BundleError(f"bundle {root}: {name}: {why}")


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"bundle {root}: not a directory")
    try:
        if path.stat().st_size > _MAX_MANIFEST_BYTES:
            raise _fail(root, MANIFEST, "larger than 64 MiB: not a manifest")
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise _fail(root, MANIFEST, "missing (not a recmem bundle)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _fail(root, MANIFEST, f"does not read as JSON ({e})") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise _fail(root, MANIFEST, problem)
    return manifest


def _manifest_problem(m: Any) -> str | None:
    """What is wrong with a parsed manifest's structure, or None."""
    if not isinstance(m, dict):
        return "not an object"
    if m.get("bundle_format") != BUNDLE_FORMAT:
        return f"bundle_format {m.get('bundle_format')!r}; this recmem reads {BUNDLE_FORMAT}"
    if not isinstance(m.get("version"), str) or not m["version"]:
        return "version must be a non-empty string"
    schema, inputs, dense = m.get("schema"), m.get("inputs"), m.get("dense")
    if not isinstance(schema, dict) or not isinstance(schema.get("label"), str) \
            or not _names(schema.get("dense")) or not _names(schema.get("sparse")) or not schema["sparse"]:
        return "schema must hold label, dense and sparse field names"
    if not isinstance(inputs, dict) or inputs.get("sparse_strings") not in ("hex", "hash"):
        return "inputs.sparse_strings must be 'hex' or 'hash'"
    if m.get("quantization") not in FORMATS:
        return f"quantization must be one of {list(FORMATS)}"
    if not isinstance(dense, dict) or dense.get("format") not in ("torch.export", "torchscript") \
            or not isinstance(dense.get("file"), str):
        return "dense must name its file and format (torch.export or torchscript)"
    tables = m.get("tables")
    if not isinstance(tables, list) or len(tables) != len(schema["sparse"]):
        return "tables must list one table per sparse feature"
    width = None
    for i, t in enumerate(tables):
        if not isinstance(t, dict) or t.get("feature") != schema["sparse"][i]:
            return f"tables.{i} must be the table of feature {schema['sparse'][i]!r}"
        if t.get("lookup") not in LOOKUPS or not isinstance(t.get("files"), dict) \
                or not all(isinstance(k, str) and isinstance(v, str) for k, v in t["files"].items()):
            return f"tables.{i}: lookup must be one of {', '.join(LOOKUPS)} and files a map of names"
        if not isinstance(t.get("width"), int) or t["width"] < 1 or (width is not None and t["width"] != width):
            return f"tables.{i}: width must be one positive integer for all tables"
        width = t["width"]
    files = m.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("bytes"), int)
            for v in files.values()):
        return "files must map each file to its sha256 and bytes"
    return None


def _names(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(n, str) and n for n in x) and len(set(x)) == len(x)


def _verified_files(root: Path, manifest: dict[str, Any]) -> dict[str, Path]:
    """Every file the manifest lists, checked (inside the bundle, size, SHA-256): name -> path."""
    base = root.resolve()
    out = {}
    for name, record in manifest["files"].items():
        path = (root / name).resolve()
        if name == MANIFEST or not path.is_relative_to(base) or Path(name).is_absolute() or ".." in Path(name).parts:
            raise _fail(root, name, "not a file inside the bundle")
        try:
            size = path.stat().st_size
            if not path.is_file():
                raise _fail(root, name, "not a regular file")
            if size != record["bytes"]:
                raise _fail(root, name, f"{size:,} bytes where the manifest says {record['bytes']:,} (truncated or replaced)")
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
        except FileNotFoundError:
            raise _fail(root, name, "missing") from None
        except OSError as e:
            raise _fail(root, name, f"unreadable ({e.strerror or e})") from None
        if digest != record["sha256"]:
            raise _fail(root, name, "its SHA-256 differs from the manifest's: the bytes changed after the export")
        out[name] = path
    return out


def _load_table(root: Path, files: dict[str, Path], entry: dict[str, Any], i: int, manifest: dict) -> Lookup:
    arrays = {}
    for array, name in entry["files"].items():
        if array not in _ARRAY_DTYPES:
            raise _fail(root, name, f"unknown table array {array!r}")
        if name not in files:
            raise _fail(root, name, "a table file the manifest does not list with its checksum")
        try:
            data = np.load(files[name], allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise _fail(root, name, f"not a NumPy array file ({e})") from None
        if not isinstance(data, np.ndarray) or data.dtype.type not in _ARRAY_DTYPES[array]:
            raise _fail(root, name, f"{array} of dtype {getattr(data, 'dtype', '?')} is not allowed")
        arrays[array] = torch.from_numpy(np.ascontiguousarray(data))
    try:
        lookup = lookup_from_tensors(entry["lookup"], arrays)
    except ValueError as e:
        raise _fail(root, f"tables.{i} ({entry['feature']})", str(e)) from None
    if lookup.width != entry["width"]:
        raise _fail(root, f"tables.{i} ({entry['feature']})", f"rows are {lookup.width} wide, the manifest says {entry['width']}")
    if lookup.rows.format != manifest["quantization"]:
        raise _fail(root, f"tables.{i} ({entry['feature']})", f"rows are {lookup.rows.format}, the manifest says {manifest['quantization']}")
    return lookup


def _load_dense(root: Path, files: dict[str, Path], manifest: dict[str, Any]) -> torch.nn.Module:
    spec = manifest["dense"]
    name = spec["file"]
    if name not in files:
        raise _fail(root, name, "the dense file is not listed with its checksum")
    try:
        if spec["format"] == "torch.export":
            _check_pt2(root, name, files[name])
            # Exported in eval mode; the module of an ExportedProgram refuses .eval()/.train().
            module = torch.export.load(str(files[name])).module()
        else:
            module = torch.jit.load(str(files[name]), map_location="cpu").eval()
    except BundleError:
        raise
    except Exception as e:  # torch raises many kinds on a bad archive
        raise _fail(root, name, f"does not load as {spec['format']} ({type(e).__name__}: {str(e)[:200]})") from None
    return module


def _check_pt2(root: Path, name: str, path: Path) -> None:
    """Refuse a ``torch.export`` archive that would unpickle anything on load.

    ``torch.export.load`` unpickles (without ``weights_only``) weights and constants whose config
    entry says ``use_pickle``, custom and opaque objects, the legacy single-file weights, and sample
    inputs that fail to load with ``weights_only``; an export of a plain dense module has none of
    them, so a bundle holding one is refused unread.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            for member in names:
                parts = member.split("/")
                if len(parts) >= 3 and parts[-3] == "data" and parts[-2] in ("weights", "constants"):
                    if member.endswith(".pt") or parts[-1].startswith(("custom_obj", "opaque_obj")):
                        raise _fail(root, name, f"holds {member}, which would be unpickled: refused unread")
                    if parts[-1].endswith("_config.json"):
                        config = json.loads(archive.read(member))
                        if _uses_pickle(config):
                            raise _fail(root, name, f"{member} asks for unpickling: refused unread")
                elif len(parts) >= 3 and parts[-3] == "data" and parts[-2] == "sample_inputs":
                    # torch.export.load reads these with weights_only=True but falls back to a full
                    # unpickling when that fails: they must pass weights_only here first.
                    try:
                        torch.load(io.BytesIO(archive.read(member)), map_location="cpu", weights_only=True)
                    except Exception as e:
                        raise _fail(root, name, f"{member} is not plain tensors, refused unread "
                                                f"({str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__})") from None
    except (zipfile.BadZipFile, OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(root, name, f"not a torch.export archive ({e})") from None


def _uses_pickle(config: Any) -> bool:
    """True when any entry of a PT2 payload config asks for pickle (or is not what an entry should be)."""
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        return True
    for entry in entries.values():
        if not isinstance(entry, dict) or entry.get("use_pickle", False) is not False:
            return True
        path_name = entry.get("path_name", "")
        if not isinstance(path_name, str) or path_name.startswith(("custom_obj", "opaque_obj")):
            return True
    return False

