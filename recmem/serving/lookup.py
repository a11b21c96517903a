"""The serving form of a table: one feature's rows behind a pure-torch lookup (no torchrec, fbgemm, numba).

Every table kind hands the exporter, per feature, one of these lookups (its ``to_serving`` method):

- :class:`KeyedLookup`: sorted raw IDs, a row each, and a default row for any other ID. ``full``
  uses it with its out-of-vocabulary row as the default; ``collisionless`` with a zero row (an ID
  without a row pools to nothing in training, which a zero row reproduces exactly).
- :class:`ModuloLookup`: ``id mod n`` picks the row (``hash``): every ID has a row, none is unseen.
- :class:`ComposedLookup`: vocabulary position or hashed OOV row r, then row r or the
  quotient-remainder composition of two rows (``qr``, ``full`` with several OOV buckets).
- ``MultiHashLookup`` (``recmem/serving/hashed.py``): k hashed rows of one shared table, summed or
  concatenated (``multihash``).

Either may carry a ``projection`` [D, d]: a table that stores rows of width d and maps them to the
model's width D by a learned linear map (no bias) answers ``pooled @ projection.T``; pooling is a
sum, so projecting the pooled rows equals pooling the projected ones.

Rows may be stored as fp32, fp16 or int8 (row-wise: ``row = q * scale + bias`` with ``q`` in
0..255, ``scale`` and ``bias`` fp32 per row); they stay in that form in memory and only the rows a
batch touches are dequantized. Lookups are immutable: :meth:`with_rows` returns a new one.

Input of every lookup, per feature (jagged, as a KJT's slice for that key)::

    values  [N] int64 raw IDs      lengths [B] int64 bag sizes (sum = N)  ->  pooled [B, D] float32 (sum)
"""

from __future__ import annotations

import torch

FORMATS = ("fp32", "fp16", "int8")
"""Row storage formats of a bundle."""


class QuantizedRows:
    """Rows [n, D] stored as fp32, fp16 or row-wise int8, dequantized on gather.

    Args:
        data: [n, D] float32 / float16, or uint8 for int8.
        scale: [n] float32 (int8 only).
        bias: [n] float32 (int8 only).
    """

    def __init__(self, data: torch.Tensor, scale: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> None:
        self.data, self.scale, self.bias = data, scale, bias
        self.format = {torch.float32: "fp32", torch.float16: "fp16", torch.uint8: "int8"}[data.dtype]

    @classmethod
    def quantize(cls, rows: torch.Tensor, fmt: str) -> "QuantizedRows":
        """fp32 rows [n, D] -> stored in ``fmt`` (int8: each row's min -> 0, max -> 255)."""
        rows = rows.detach().to(torch.float32).contiguous()
        if fmt == "fp32":
            return cls(rows.clone())
        if fmt == "fp16":
            return cls(rows.to(torch.float16))
        if fmt != "int8":
            raise ValueError(f"unknown row format {fmt!r} (known: {', '.join(FORMATS)})")
        if rows.shape[0] == 0:
            empty = torch.zeros(0, dtype=torch.float32)
            return cls(torch.zeros(rows.shape, dtype=torch.uint8), empty, empty.clone())
        low, high = rows.min(dim=1).values, rows.max(dim=1).values  # [n]
        scale = (high - low) / 255.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round((rows - low[:, None]) / safe[:, None]).clamp_(0, 255).to(torch.uint8)  # [n, D]
        return cls(q, scale, low)

    def __len__(self) -> int:
        return int(self.data.shape[0])

    @property
    def width(self) -> int:
        """D."""
        return int(self.data.shape[1])

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` [N] -> [N, D] float32."""
        rows = self.data.index_select(0, index)
        if self.format != "int8":
            return rows.to(torch.float32)
        return rows.to(torch.float32) * self.scale.index_select(0, index)[:, None] + self.bias.index_select(0, index)[:, None]

    def dense(self) -> torch.Tensor:
        """All rows [n, D] float32."""
        return self.gather(torch.arange(len(self)))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored arrays by name: ``rows`` and, for int8, ``scale`` and ``bias``."""
        out = {"rows": self.data}
        if self.format == "int8":
            out.update(scale=self.scale, bias=self.bias)
        return out

    def nbytes(self) -> int:
        """Bytes held."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def replaced(self, index: torch.Tensor, rows: torch.Tensor) -> "QuantizedRows":
        """A copy with rows ``index`` [k] set to ``rows`` [k, D] float32 (quantized as this one)."""
        fresh = QuantizedRows.quantize(rows, self.format)
        data = self.data.clone()
        data[index] = fresh.data
        if self.format != "int8":
            return QuantizedRows(data)
        scale, bias = self.scale.clone(), self.bias.clone()
        scale[index], bias[index] = fresh.scale, fresh.bias
        return QuantizedRows(data, scale, bias)

    def selected(self, keep: torch.Tensor) -> "QuantizedRows":
        """A copy holding only rows ``keep`` [k] (indices), in that order."""
        if self.format != "int8":
            return QuantizedRows(self.data.index_select(0, keep))
        return QuantizedRows(self.data.index_select(0, keep), self.scale.index_select(0, keep),
                             self.bias.index_select(0, keep))

    @staticmethod
    def concat(parts: list["QuantizedRows"]) -> "QuantizedRows":
        """Rows of ``parts`` one after the other (all of one format)."""
        data = torch.cat([p.data for p in parts])
        if parts[0].format != "int8":
            return QuantizedRows(data)
        return QuantizedRows(data, torch.cat([p.scale for p in parts]), torch.cat([p.bias for p in parts]))


def pool(rows: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Sum ``rows`` [N, D] into bags of ``lengths`` [B] -> [B, D] (an empty bag is a zero row)."""
    bags = torch.repeat_interleave(torch.arange(lengths.shape[0]), lengths)  # [N] bag of each row
    return rows.new_zeros(lengths.shape[0], rows.shape[1]).index_add_(0, bags, rows)


class KeyedLookup:
    """Sorted raw IDs -> rows; any other ID gets ``default``.

    Args:
        keys: [n] int64, strictly ascending.
        rows: the n rows.
        default: [D] float32, the row of an ID not in ``keys``.
    """

    kind = "keyed"

    def __init__(self, keys: torch.Tensor, rows: QuantizedRows, default: torch.Tensor) -> None:
        self.keys, self.rows, self.default = keys, rows, default

    @property
    def width(self) -> int:
        """D."""
        return int(self.default.shape[0])

    def positions(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N] raw IDs -> ([N] row of each ID, clamped; [N] bool: the ID has that row)."""
        n = self.keys.shape[0]
        if n == 0:
            return torch.zeros_like(values), torch.zeros(values.shape, dtype=torch.bool)
        pos = torch.searchsorted(self.keys, values).clamp_(max=n - 1)
        return pos, self.keys[pos] == values

    def __call__(self, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """values [N] int64, lengths [B] -> [B, D] summed rows."""
        pos, hit = self.positions(values)
        if not len(self.rows):  # no keys yet (a collisionless table before its first ID): all default
            return pool(self.default[None, :].expand(values.shape[0], -1), lengths)
        rows = torch.where(hit[:, None], self.rows.gather(pos), self.default[None, :])  # [N, D]
        return pool(rows, lengths)

    def with_rows(self, ids: torch.Tensor, rows: torch.Tensor, deleted: torch.Tensor) -> "KeyedLookup":
        """A new lookup: ``deleted`` [m] IDs removed (they get the default), then ``ids`` [k] set to
        ``rows`` [k, D] (new IDs inserted in order)."""
        keep = ~torch.isin(self.keys, torch.cat([deleted, ids]))
        kept = torch.nonzero(keep).flatten()
        keys = torch.cat([self.keys[kept], ids])
        order = torch.argsort(keys)
        old = self.rows.selected(kept)
        added = QuantizedRows.quantize(rows, self.rows.format)
        merged = QuantizedRows.concat([old, added]).selected(order)
        return KeyedLookup(keys[order], merged, self.default)

    def tensors(self) -> dict[str, torch.Tensor]:
        """What a bundle stores of it."""
        return {"keys": self.keys, "default": self.default, **self.rows.tensors()}

    def nbytes(self) -> int:
        """Bytes held."""
        return self.keys.numel() * 8 + self.rows.nbytes() + self.default.numel() * 4


class ModuloLookup:
    """Raw ID -> row ``id mod n`` (non-negative remainder, as the ``hash`` kind trains).

    Args:
        rows: the n rows.
    """

    kind = "modulo"

    def __init__(self, rows: QuantizedRows) -> None:
        self.rows = rows

    @property
    def width(self) -> int:
        """D."""
        return self.rows.width

    def __call__(self, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """values [N] int64, lengths [B] -> [B, D] summed rows."""
        return pool(self.rows.gather(torch.remainder(values, len(self.rows))), lengths)

    def with_rows(self, ids: torch.Tensor, rows: torch.Tensor, deleted: torch.Tensor) -> "ModuloLookup":
        """A new lookup with rows number ``ids`` [k] (in ``[0, n)``) set to ``rows`` [k, D]."""
        if deleted.numel():
            raise ValueError("a modulo (hash) table has no IDs to delete; send the rows instead")
        return ModuloLookup(self.rows.replaced(ids, rows))

    def tensors(self) -> dict[str, torch.Tensor]:
        """What a bundle stores of it."""
        return self.rows.tensors()

    def nbytes(self) -> int:
        """Bytes held."""
        return self.rows.nbytes()


COMPOSE_OPS = ("single", "mult", "add", "concat")
"""How a :class:`ComposedLookup` turns row number r into an embedding (``params[4]`` indexes this)."""


class ComposedLookup:
    """Raw ID -> row number r -> an embedding: one row, or two rows composed (quotient-remainder).

    r is the ID's position in the sorted vocabulary ``keys``, else ``n + bucket`` with ``bucket``
    the ID's hash (``recmem.serving.hashing``) into ``oov_buckets`` shared rows. Then, by ``op``:
    ``single``: row r; ``mult`` / ``add`` / ``concat``: rows ``r // c`` (quotient, the first
    ``quotient_rows`` rows) and ``quotient_rows + r % c`` (remainder) multiplied element-wise,
    added, or concatenated. Each ID's embedding is composed before the bag is summed.

    Args:
        keys: [n] int64, strictly ascending.
        rows: single: n + oov_buckets rows; composed: quotient rows, then c remainder rows.
        params: [6] int64: oov_buckets, hash multiplier, hash offset, c, op (index in
            :data:`COMPOSE_OPS`), quotient_rows.
    """

    kind = "composed"

    def __init__(self, keys: torch.Tensor, rows: QuantizedRows, params: torch.Tensor) -> None:
        self.keys, self.rows, self.params = keys, rows, params
        self._oov, self._mult, self._offset, self._c, op, self._quotient_rows = (int(x) for x in params)
        self.op = COMPOSE_OPS[op]

    @property
    def width(self) -> int:
        """The embedding width (twice the rows' for concat)."""
        return self.rows.width * (2 if self.op == "concat" else 1)

    def row_numbers(self, values: torch.Tensor) -> torch.Tensor:
        """[N] raw IDs -> [N] int64 row numbers r (vocabulary position, else a hashed OOV row)."""
        from recmem.serving.hashing import buckets

        n = self.keys.shape[0]
        oov = n + buckets(values, self._mult, self._offset, self._oov)
        if n == 0:
            return oov
        pos = torch.searchsorted(self.keys, values).clamp_(max=n - 1)
        return torch.where(self.keys[pos] == values, pos, oov)

    def __call__(self, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """values [N] int64, lengths [B] -> [B, width] summed embeddings."""
        r = self.row_numbers(values)
        if self.op == "single":
            return pool(self.rows.gather(r), lengths)
        quotient = self.rows.gather(torch.div(r, self._c, rounding_mode="floor"))  # [N, d]
        remainder = self.rows.gather(self._quotient_rows + torch.remainder(r, self._c))  # [N, d]
        if self.op == "mult":
            return pool(quotient * remainder, lengths)
        if self.op == "add":
            return pool(quotient + remainder, lengths)
        return pool(torch.cat([quotient, remainder], dim=1), lengths)

    def with_rows(self, ids: torch.Tensor, rows: torch.Tensor, deleted: torch.Tensor) -> "ComposedLookup":
        """A new lookup with stored rows number ``ids`` [k] set to ``rows`` [k, d]."""
        if deleted.numel():
            raise ValueError("a composed table has no IDs to delete; send its rows")
        return ComposedLookup(self.keys, self.rows.replaced(ids, rows), self.params)

    def tensors(self) -> dict[str, torch.Tensor]:
        """What a bundle stores of it."""
        return {"keys": self.keys, "params": self.params, **self.rows.tensors()}

    def nbytes(self) -> int:
        """Bytes held."""
        return self.keys.numel() * 8 + self.rows.nbytes() + self.params.numel() * 8


def _composed_lookup(tensors: dict[str, torch.Tensor], rows: QuantizedRows) -> ComposedLookup:
    from recmem.serving.hashing import PRIME

    keys, params = _array(tensors, "keys", torch.int64, 1), _array(tensors, "params", torch.int64, 1)
    if params.shape[0] != 6:
        raise ValueError("params must hold 6 integers")
    oov, mult, offset, c, op, quotient_rows = (int(x) for x in params)
    if oov < 1 or not 1 <= mult < PRIME or not 0 <= offset < PRIME or c < 1 or not 0 <= op < len(COMPOSE_OPS):
        raise ValueError(f"params {params.tolist()} are out of range")
    n = keys.shape[0] + oov
    need = n if COMPOSE_OPS[op] == "single" else -(-n // c) + c
    if (COMPOSE_OPS[op] != "single" and quotient_rows != -(-n // c)) or len(rows) != need:
        raise ValueError(f"{len(rows)} rows for {n} row numbers under {COMPOSE_OPS[op]} (c={c}); expected {need}")
    if keys.shape[0] > 1 and not bool((keys[1:] > keys[:-1]).all()):
        raise ValueError("keys are not strictly ascending")
    return ComposedLookup(keys, rows, params)


class ProjectedLookup:
    """A lookup of rows of width d, pooled, then mapped to width D by ``projection`` [D, d].

    Args:
        inner: the lookup of the stored rows.
        projection: [D, d] float32, the table's learned map (no bias).
    """

    def __init__(self, inner: "KeyedLookup | ModuloLookup | ComposedLookup", projection: torch.Tensor) -> None:
        self.inner, self.projection = inner, projection
        self.kind = inner.kind

    @property
    def rows(self) -> QuantizedRows:
        """The stored rows (width d)."""
        return self.inner.rows

    @property
    def width(self) -> int:
        """D, the output width."""
        return int(self.projection.shape[0])

    def __call__(self, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """values [N] int64, lengths [B] -> [B, D] projected sums."""
        return self.inner(values, lengths) @ self.projection.T  # [B, d] @ [d, D]

    def with_rows(self, ids: torch.Tensor, rows: torch.Tensor, deleted: torch.Tensor) -> "ProjectedLookup":
        """As the inner lookup's, with rows of the stored width d."""
        return ProjectedLookup(self.inner.with_rows(ids, rows, deleted), self.projection)

    def tensors(self) -> dict[str, torch.Tensor]:
        """What a bundle stores of it."""
        return {**self.inner.tensors(), "projection": self.projection}

    def nbytes(self) -> int:
        """Bytes held."""
        return self.inner.nbytes() + self.projection.numel() * 4


Lookup = KeyedLookup | ModuloLookup | ComposedLookup | ProjectedLookup  # or a hashed.MultiHashLookup

LOOKUPS = ("keyed", "modulo", "composed", "multihash")
"""Every lookup kind a serving form may name."""


def lookup_from_tensors(kind: str, tensors: dict[str, torch.Tensor]) -> Lookup:
    """Rebuild a lookup from what :meth:`tensors` gave (shapes and dtypes checked); a
    ``projection`` array wraps it in a :class:`ProjectedLookup`.

    Raises:
        ValueError: a missing array, a wrong dtype or shape, or keys not strictly ascending.
    """
    if "projection" not in tensors:
        return _plain_lookup(kind, tensors)
    inner = _plain_lookup(kind, {k: v for k, v in tensors.items() if k != "projection"})
    projection = _array(tensors, "projection", torch.float32, 2)
    if projection.shape[1] != inner.width:
        raise ValueError(f"projection {tuple(projection.shape)} does not take rows of width {inner.width}")
    if not bool(torch.isfinite(projection).all()):
        raise ValueError("the projection is not finite")
    return ProjectedLookup(inner, projection)


def _plain_lookup(kind: str, tensors: dict[str, torch.Tensor]) -> "KeyedLookup | ModuloLookup | ComposedLookup":
    rows = _rows_from(tensors)
    if kind == "composed":
        return _composed_lookup(tensors, rows)
    if kind == "multihash":
        from recmem.serving.hashed import multihash_lookup

        return multihash_lookup(_array(tensors, "params", torch.int64, 1), rows)
    if kind == "modulo":
        if len(rows) < 1:
            raise ValueError("a modulo table needs at least one row")
        return ModuloLookup(rows)
    if kind != "keyed":
        raise ValueError(f"unknown lookup kind {kind!r}")
    keys, default = _array(tensors, "keys", torch.int64, 1), _array(tensors, "default", torch.float32, 1)
    if keys.shape[0] != len(rows) or default.shape[0] != rows.width:
        raise ValueError(f"keys {tuple(keys.shape)}, rows {tuple(rows.data.shape)} and default "
                         f"{tuple(default.shape)} do not match")
    if keys.shape[0] > 1 and not bool((keys[1:] > keys[:-1]).all()):
        raise ValueError("keys are not strictly ascending")
    if not bool(torch.isfinite(default).all()):
        raise ValueError("the default row is not finite")
    return KeyedLookup(keys, rows, default)


def _rows_from(tensors: dict[str, torch.Tensor]) -> QuantizedRows:
    data = tensors.get("rows")
    if not isinstance(data, torch.Tensor) or data.dim() != 2 or data.dtype not in (torch.float32, torch.float16, torch.uint8):
        raise ValueError("rows must be a 2-D float32, float16 or uint8 array")
    if data.dtype != torch.uint8:
        if not bool(torch.isfinite(data).all()):
            raise ValueError("rows hold non-finite values")
        return QuantizedRows(data)
    scale, bias = _array(tensors, "scale", torch.float32, 1), _array(tensors, "bias", torch.float32, 1)
    if scale.shape[0] != data.shape[0] or bias.shape[0] != data.shape[0]:
        raise ValueError("int8 rows need a scale and a bias per row")
    if not (bool(torch.isfinite(scale).all()) and bool(torch.isfinite(bias).all())):
        raise ValueError("int8 scale or bias is not finite")
    return QuantizedRows(data, scale, bias)


def _array(tensors: dict[str, torch.Tensor], name: str, dtype: torch.dtype, dims: int) -> torch.Tensor:
    t = tensors.get(name)
    if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.dim() != dims:
        raise ValueError(f"{name} must be a {dims}-D {dtype} array")
    return t

