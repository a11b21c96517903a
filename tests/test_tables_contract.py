"""The contract every table kind meets: shapes, sparse training, state round trip, memory accounting,
and a serving form (``to_serving``, pure torch: ``recmem/serving/lookup.py``) that answers exactly as
the trained table.

A new kind must add an entry to KIND_CONFIGS (the test below fails until it does) and bring its
serving form; a variant of a kind whose behaviour differs (``full`` with hashed OOV buckets) gets an
entry of its own.
"""

from __future__ import annotations

import io

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recmem.config import ConfigError, TableConfig
from recmem.tables import TABLE_KINDS, build_tables
from recmem.tables.base import EmbeddingTable
from tests.conftest import small_schema

SCHEMA = small_schema()
KIND_CONFIGS = {
    "full": TableConfig(kind="full", embedding_dim=8),
    # min_count 10: the tail of the tiny data's skewed IDs shares 5 hashed rows with unseen IDs
    "full_buckets": TableConfig(kind="full", embedding_dim=8, options={"min_count": 10, "oov_buckets": 5}),
    "hash": TableConfig(kind="hash", embedding_dim=8, num_embeddings=64),
    "collisionless": TableConfig(kind="collisionless", embedding_dim=8, options={"capacity": 1000, "initial_rows": 16}),
    # threshold 30: the tiny data's features of ~50 IDs are composed, smaller ones stay full
    "qr": TableConfig(kind="qr", embedding_dim=8, options={"collisions": 4, "threshold": 30, "oov_buckets": 3}),
    "multihash": TableConfig(kind="multihash", embedding_dim=8, num_embeddings=24, options={"num_hashes": 3}),
    # the tiny data's features all have 51 IDs: every width is d0, no projection
    "mixed_dim": TableConfig(kind="mixed_dim", embedding_dim=8, options={"alpha": 0.5}),
    # min_count 10 leaves 53, 53, 51, 50 row numbers; alpha 10 spreads them to widths 4, 4, 6 (stored 8), 8:
    # two fused kernels, the width-4 one projected to 8
    "mixed_dim_buckets": TableConfig(kind="mixed_dim", embedding_dim=8,
                                     options={"alpha": 10.0, "min_count": 10, "oov_buckets": 5}),
    # the supernet at fixed full width (sampled widths make two forwards differ; test_optembed.py checks them)
    "optembed": TableConfig(kind="optembed", embedding_dim=8, options={"sample_widths": False, "min_count": 10}),
    # the retrained table of a plan the fixture writes: widths 3, 8, 5, 1, every other ID kept
    "optembed_retrained": TableConfig(kind="optembed", embedding_dim=8, options={"plan": "<written by the fixture>"}),
    # rows on disk behind a cache of 200 of its 256 rows, in a folder of each test's own
    "ssd": TableConfig(kind="ssd", embedding_dim=8, num_embeddings=64, options={"cache_rows": 200, "path": "<tmp>"}),
}

SHARED_ROWS = {"hash", "qr", "full_buckets", "multihash", "mixed_dim_buckets", "ssd"}
"""Variants whose IDs share stored rows by design (hash collisions, quotient and remainder rows,
hashed OOV buckets, multi-hash rows)."""


def test_every_kind_is_covered():
    assert {cfg.kind for cfg in KIND_CONFIGS.values()} == set(TABLE_KINDS)


def _kjt(ids_per_feature: list[list[list[int]]]) -> KeyedJaggedTensor:
    """Per feature, per row, a bag of raw IDs."""
    lengths = [len(bag) for feature in ids_per_feature for bag in feature]
    values = [i for feature in ids_per_feature for bag in feature for i in bag]
    return KeyedJaggedTensor.from_lengths_sync(
        SCHEMA.sparse, torch.tensor(values, dtype=torch.int64), torch.tensor(lengths, dtype=torch.int32)
    )


def _known_ids(root, n=3):
    from recmem.data.stats import load_ids

    return [load_ids(root, f)[:n].tolist() for f in SCHEMA.sparse]


def _with_plan(cfg: TableConfig, root, folder) -> TableConfig:
    """``cfg`` with an optembed plan written to ``folder`` when it asks for one."""
    if cfg.options.get("plan") != "<written by the fixture>":
        return cfg
    from recmem.data.stats import load_ids
    from recmem.tables.optembed import Plan

    keys = [torch.as_tensor(load_ids(root, f)[::2].copy()) for f in SCHEMA.sparse]
    Plan(SCHEMA.sparse, 8, [3, 8, 5, 1], keys, [True, False, True, False]).save(folder / "plan.pt")
    return TableConfig(kind=cfg.kind, embedding_dim=cfg.embedding_dim, options={"plan": str(folder / "plan.pt")})


def _with_folder(cfg: TableConfig, folder) -> TableConfig:
    """``cfg`` with its row folder (``ssd``) inside the test's ``folder``."""
    if cfg.options.get("path") != "<tmp>":
        return cfg
    return TableConfig(kind=cfg.kind, embedding_dim=cfg.embedding_dim, num_embeddings=cfg.num_embeddings,
                       options={**cfg.options, "path": str(folder / "ssd_rows")})


@pytest.fixture(params=sorted(KIND_CONFIGS))
def tables(request, tiny_root, tmp_path):
    config = _with_folder(_with_plan(KIND_CONFIGS[request.param], tiny_root, tmp_path), tmp_path)
    tables = build_tables([config], SCHEMA.sparse, tiny_root, seed=1)
    tables.variant, tables.config = request.param, config
    return tables


def test_forward_shape_and_pooling(tables, tiny_root):
    ids = _known_ids(tiny_root)
    bags = [[[f[0]], [f[0], f[1]], []] for f in ids]  # rows: one ID, two IDs, empty bag
    out = tables(_kjt(bags))
    assert out.shape == (3, len(SCHEMA.sparse), 8)
    single = tables(_kjt([[[f[0]], [f[1]], []] for f in ids]))
    torch.testing.assert_close(out[1], single[0] + single[1])  # sum pooling
    assert torch.all(out[2] == 0)  # an empty bag pools to zero
    assert isinstance(tables.tables[0], EmbeddingTable)


def test_backward_updates_only_touched_rows(tables, tiny_root):
    ids = _known_ids(tiny_root)
    probe = _kjt([[[f[1]]] for f in ids])
    before_untouched = tables(probe).detach().clone()
    batch = _kjt([[[f[0]]] for f in ids])
    before = tables(batch).detach().clone()
    tables(batch).sum().backward()
    after = tables(batch).detach()
    assert not torch.allclose(before, after), "the fused optimizer must move the looked-up rows"
    assert (after - before).sum() < 0, "minimising the sum pushes embeddings down"
    if tables.variant not in SHARED_ROWS:
        torch.testing.assert_close(tables(probe), before_untouched)


def test_state_round_trip_continues_identically(tables, tiny_root):
    if tables.variant == "ssd":
        pytest.skip("an ssd checkpoint names records in its own folder, which one table at a time opens: "
                    "tests/test_ssd.py restores it there")
    ids = _known_ids(tiny_root)
    batch = _kjt([[[f[0]], [f[2]]] for f in ids])
    tables(batch).sum().backward()
    buffer = io.BytesIO()
    torch.save(tables.state_dict(), buffer)
    clone = build_tables([tables.config], SCHEMA.sparse, tiny_root, seed=99)
    buffer.seek(0)
    clone.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(clone(batch), tables(batch))
    for t in (tables, clone):  # one more step each: optimizer state must have travelled too
        t(batch).pow(2).sum().backward()
    torch.testing.assert_close(clone(batch), tables(batch))


def test_memory_accounting(tables):
    # fbgemm keeps rows (weights_host) and the Adagrad state (momentum1_host) as parameters
    held = sum(p.numel() * p.element_size() for p in tables.parameters())
    reported = tables.memory_bytes()
    assert reported >= held
    assert reported <= 1.5 * held + 64 * 1024
    assert tables.stats()["memory_bytes"] == reported


def test_build_errors_name_the_key(tiny_root):
    with pytest.raises(ConfigError, match="model.tables.0.kind: unknown table kind 'nope'"):
        build_tables([TableConfig(kind="nope")], SCHEMA.sparse, tiny_root)
    with pytest.raises(ConfigError, match="model.tables.0.num_embeddings"):
        build_tables([TableConfig(kind="hash")], SCHEMA.sparse, tiny_root)
    with pytest.raises(ConfigError, match="model.tables.0.options.min_cnt: unknown key"):
        build_tables([TableConfig(kind="full", options={"min_cnt": 2})], SCHEMA.sparse, tiny_root)
    with pytest.raises(ConfigError, match="'C9' is not a sparse feature"):
        build_tables([TableConfig(feature_names=["C9"])], SCHEMA.sparse, tiny_root)
    with pytest.raises(ConfigError, match="no table for features"):
        build_tables([TableConfig(feature_names=["C1"])], SCHEMA.sparse, tiny_root)


def test_mixed_blocks_route_features_in_schema_order(tiny_root):
    blocks = [TableConfig(kind="hash", num_embeddings=32, feature_names=["C3", "C1"]), TableConfig(kind="full")]
    mixed = build_tables(blocks, SCHEMA.sparse, tiny_root)
    ids = _known_ids(tiny_root)
    batch = _kjt([[[f[0]]] for f in ids])
    out = mixed(batch)
    hashed = mixed.tables[0](KeyedJaggedTensor.from_lengths_sync(
        ["C3", "C1"], torch.tensor([ids[2][0], ids[0][0]]), torch.tensor([1, 1], dtype=torch.int32)
    ))
    torch.testing.assert_close(out[:, 2], hashed[:, 0])
    torch.testing.assert_close(out[:, 0], hashed[:, 1])


def test_full_min_count_shrinks_vocabulary(tiny_root):
    all_ids = build_tables([TableConfig(kind="full")], SCHEMA.sparse, tiny_root)
    frequent = build_tables([TableConfig(kind="full", options={"min_count": 20})], SCHEMA.sparse, tiny_root)
    assert frequent.memory_bytes() < all_ids.memory_bytes()


def test_serving_form_answers_as_the_trained_table(tables, tiny_root):
    """Trained rows, then the pure-torch serving form: the same pooled rows for known IDs, unseen
    IDs, the missing ID, negative IDs, multi-ID bags and empty bags."""
    from recmem.serving.lookup import lookup_from_tensors

    ids = _known_ids(tiny_root)
    tables(_kjt([[[f[0], f[1]], [f[2]]] for f in ids])).sum().backward()  # rows move (and get admitted)
    tables.eval()
    bags = [[[f[0]], [f[1], f[2], f[0]], [], [-1], [123456789, f[0]], [-(2**62)]] for f in ids]
    expected = tables(_kjt(bags))  # [B, F, D]
    forms = tables.to_serving()
    assert [form.lookup for form in forms] and len(forms) == len(SCHEMA.sparse)
    for i, form in enumerate(forms):
        lookup = lookup_from_tensors(form.lookup, form.tensors)
        values = torch.tensor([x for bag in bags[i] for x in bag], dtype=torch.int64)
        lengths = torch.tensor([len(bag) for bag in bags[i]], dtype=torch.int64)
        torch.testing.assert_close(lookup(values, lengths), expected[:, i], rtol=0, atol=1e-6)
        assert "momentum" not in form.tensors  # rows only, no optimizer state


def test_dense_parameters_and_auxiliary_loss(tables, tiny_root):
    """A kind's own dense parameters are parameters of the table that get a gradient (the dense
    optimizer steps them; fused rows never appear); its auxiliary loss is a finite scalar or None."""
    ids = _known_ids(tiny_root)
    batch = _kjt([[[f[0]], [f[1]]] for f in ids])
    out = tables(batch)
    aux = tables.auxiliary_loss()
    assert aux is None or (aux.dim() == 0 and bool(torch.isfinite(aux)))
    own = tables.dense_parameters()
    assert all(any(p is q for q in tables.parameters()) for p in own)
    assert not any(p is t.rows.tbe.weights_host for t in tables.tables if hasattr(t, "rows") for p in own)
    (out.sum() + (aux if aux is not None else 0)).backward()
    assert all(p.grad is not None for p in own)
    assert tables.embedding_dim == out.shape[-1] == 8
