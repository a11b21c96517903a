"""OptEmbed from its definitions (``recmem/tables/optembed``, ``recmem/train/evolution.py``): the row
mask at the threshold, the surrogate gradient's values, the regulariser and the thresholds' own Adam,
width sampling (seeded, off the global RNG, resumable), the search's determinism, and the compact
table the plan describes. (Contract suite and serving parity: ``test_tables_contract.py``; the
three phases and the command: ``test_optembed_phases.py``.)"""

from __future__ import annotations

import io
import math

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recmem.config import ConfigError, TableConfig
from recmem.data.stats import load_ids
from recmem.tables import build_tables
from recmem.tables.optembed import Plan, compact_bytes
from recmem.tables.optembed.supernet import UnitStep, row_mask, step_gradient
from recmem.train.evolution import SearchSettings, SearchState, evolve, repair
from tests.conftest import small_schema

SCHEMA = small_schema()
D = 8


def _kjt(ids_per_feature):
    lengths = [len(bag) for feature in ids_per_feature for bag in feature]
    values = [i for feature in ids_per_feature for bag in feature for i in bag]
    return KeyedJaggedTensor.from_lengths_sync(SCHEMA.sparse, torch.tensor(values, dtype=torch.int64),
                                               torch.tensor(lengths, dtype=torch.int32))


def _supernet(root, seed=1, **options):
    return build_tables([TableConfig(kind="optembed", embedding_dim=D, options=options)], SCHEMA.sparse, root,
                        seed=seed).tables[0]


def test_row_is_kept_only_when_its_l1_norm_exceeds_the_threshold():
    row = torch.tensor([[0.25, -0.5, 0.125, -0.125]])  # L1 norm exactly 1.0 in binary floats
    for threshold, kept in [(1.0, 0.0), (1.0 - 1e-6, 1.0), (1.0 + 1e-6, 0.0), (0.0, 1.0), (2.0, 0.0)]:
        assert float(row_mask(row, torch.tensor([threshold]))) == kept, threshold


def test_mask_in_the_table_zeroes_pruned_rows(tiny_root):
    table = _supernet(tiny_root)
    table.eval()
    ids = [load_ids(tiny_root, f)[:1].tolist() for f in SCHEMA.sparse]
    batch = _kjt([[[f[0]]] for f in ids])
    with torch.no_grad():
        for f in range(len(SCHEMA.sparse)):
            table.rows.weights(f)[0] = torch.tensor([0.25, -0.5, 0.125, -0.125, 0, 0, 0, 0])  # norm 1
        table.thresholds.copy_(torch.tensor([1.0, 1.0 - 1e-6, 1.0 + 1e-6, 0.5]))
        out = table(batch)[0]  # [F, D]
    assert torch.all(out[0] == 0) and torch.all(out[2] == 0)  # at and just above the norm: pruned
    assert torch.equal(out[1, :4], torch.tensor([0.25, -0.5, 0.125, -0.125])) and bool(out[3].any())


def test_surrogate_gradient_values():
    x = torch.tensor([-1.5, -1.0, -0.7, -0.4, -0.2, 0.0, 0.1, 0.4, 0.41, 1.0, 1.01], requires_grad=True)
    expected = torch.tensor([0.0, 0.4, 0.4, 0.4, 1.2, 2.0, 1.6, 0.4, 0.4, 0.4, 0.0])
    torch.testing.assert_close(step_gradient(x.detach()), expected)
    y = UnitStep.apply(x)
    assert torch.equal(y, (x > 0).float())
    (y * torch.arange(11.0)).sum().backward()
    torch.testing.assert_close(x.grad, expected * torch.arange(11.0))


def test_gradient_reaches_rows_and_threshold_through_the_norm():
    """out = e * S(|e|_1 - t): d out . g / de = g S + (g . e) S'(.) sign(e); d / dt = -(g . e) S'(.)."""
    e = torch.tensor([[0.3, -0.2, 0.1, 0.0]], requires_grad=True)
    t = torch.tensor([0.5], requires_grad=True)  # |e|_1 - t = 0.1: kept, S' = 1.6
    g = torch.tensor([[1.0, 2.0, -1.0, 3.0]])
    ((e * row_mask(e, t)[:, None]) * g).sum().backward()
    ge = float((g * e.detach()).sum())  # -0.2
    torch.testing.assert_close(e.grad, g + ge * 1.6 * torch.sign(e.detach()))
    torch.testing.assert_close(t.grad, torch.tensor([-ge * 1.6]))


def test_regulariser_and_the_thresholds_own_adam(tiny_root):
    table = _supernet(tiny_root, alpha=0.5, threshold_lr=0.01, threshold_init=2.0)
    torch.testing.assert_close(table.auxiliary_loss(), torch.tensor(0.5 * 4 * math.exp(-2.0)))
    table.auxiliary_loss().backward()  # gradient -alpha exp(-t) < 0: Adam's first step raises each t by lr
    torch.testing.assert_close(table.thresholds.detach(), torch.full((4,), 2.01))
    assert table.thresholds.grad is None and int(table.threshold_steps) == 1


def _widths_seen(table, root, batch_rows=64):
    """The widths a forward used [B, F]: every row kept, each output's non-zero prefix."""
    ids = [load_ids(root, f)[:1].tolist() for f in SCHEMA.sparse]
    out = table(_kjt([[[f[0]]] * batch_rows for f in ids])).detach()  # [B, F, D]
    return (out != 0).sum(-1)


def test_width_sampling_is_seeded_off_the_global_rng_and_resumes(tiny_root):
    a, b = _supernet(tiny_root, threshold_init=-1.0), _supernet(tiny_root, threshold_init=-1.0)
    torch.manual_seed(0)
    rng = torch.get_rng_state()
    first = _widths_seen(a, tiny_root)
    assert torch.equal(torch.get_rng_state(), rng), "the global RNG was used"
    torch.manual_seed(123)  # another global seed changes nothing
    assert torch.equal(_widths_seen(b, tiny_root), first)
    assert int(first.min()) == 1 and int(first.max()) == D  # uniform on 1..D: both ends drawn in 256
    second = _widths_seen(a, tiny_root)
    assert not torch.equal(second, first)  # a new draw each step
    saved = io.BytesIO()
    torch.save(a.state_dict(), saved)
    saved.seek(0)
    c = _supernet(tiny_root, threshold_init=-1.0)
    c.load_state_dict(torch.load(saved))
    assert torch.equal(_widths_seen(c, tiny_root), _widths_seen(a, tiny_root))  # the draw counter travels in the state
    other_seed = _supernet(tiny_root, seed=2, threshold_init=-1.0)
    assert not torch.equal(_widths_seen(other_seed, tiny_root), first)
    a.eval()
    a.set_widths([1, 3, 8, 5])
    assert _widths_seen(a, tiny_root)[0].tolist() == [1, 3, 8, 5]


def _target_score(target):
    return lambda c: -float(sum((w - t) ** 2 for w, t in zip(c, target)))


def test_search_is_deterministic_for_a_seed_and_resumes_exactly():
    settings = SearchSettings(population=8, top_k=4, mutations=4, crossovers=4, mutation_prob=0.3, iterations=6, seed=3)
    score = _target_score((2, 7, 4, 1, 8))
    one, two = evolve(5, 8, score, settings), evolve(5, 8, score, settings)
    assert list(one.scores.items()) == list(two.scores.items())
    assert one.best()[1] > max(list(one.scores.values())[:8])  # later generations improved on generation 0
    other = evolve(5, 8, score, SearchSettings(**{**settings.__dict__, "seed": 4}))
    assert list(other.scores) != list(one.scores)
    saved: list[SearchState] = []
    partial = evolve(5, 8, score, SearchSettings(**{**settings.__dict__, "iterations": 2}),
                     after_generation=lambda s: saved.append(SearchState(s.generation, dict(s.scores))))
    assert [s.generation for s in saved] == [0, 1, 2] and partial.generation == 2
    resumed = evolve(5, 8, score, settings, state=saved[1])  # from generation 1's state
    assert list(resumed.scores.items()) == list(one.scores.items())


def test_search_keeps_only_allowed_candidates(tmp_path):
    settings = SearchSettings(population=6, top_k=3, mutations=3, crossovers=3, iterations=3, seed=0)
    state = evolve(4, 8, _target_score((8, 8, 8, 8)), settings, allowed=lambda c: sum(c) <= 12)
    assert len(state.scores) >= 6 and all(sum(c) <= 12 for c in state.scores)
    assert repair((8, 2, 8, 1), lambda c: sum(c) <= 12) == (4, 2, 5, 1)  # the widest lowered first, ties: first
    assert repair((2, 2), lambda c: sum(c) <= 1) is None
    state.save(tmp_path / "state.json")
    assert SearchState.load(tmp_path / "state.json", 4, 8).scores == state.scores
    with pytest.raises(ValueError, match="not 5 widths"):
        SearchState.load(tmp_path / "state.json", 5, 8)
    with pytest.raises(ValueError, match="no allowed candidate"):
        evolve(4, 8, _target_score((1, 1, 1, 1)), settings, allowed=lambda c: False)


def _plan(root, widths, default, every=2):
    keys = [torch.as_tensor(load_ids(root, f)[::every].copy()) for f in SCHEMA.sparse]
    return Plan(SCHEMA.sparse, D, widths, keys, default)


def test_compact_table_stores_kept_rows_at_their_widths(tiny_root, tmp_path):
    plan = _plan(tiny_root, [3, 8, 5, 1], [True, False, True, False])
    plan.save(tmp_path / "plan.pt")
    tables = build_tables([TableConfig(kind="optembed", embedding_dim=D, options={"plan": str(tmp_path / "plan.pt")})],
                          SCHEMA.sparse, tiny_root)
    table = tables.tables[0]
    vocab = [load_ids(tiny_root, f) for f in SCHEMA.sparse]
    kept, pruned = [[int(v[0])] for v in vocab], [[int(v[1])] for v in vocab]
    out = tables(_kjt([[k, p, k + p, [-7]] for k, p in zip(kept, pruned)])).detach()  # [4 rows, F, D]
    for f, (width, default) in enumerate(zip(plan.widths, plan.default)):
        assert torch.all(out[:, f, width:] == 0) and bool(out[0, f, :width].any())
        if default:  # pruned and unseen IDs share the OOV row
            torch.testing.assert_close(out[1, f], out[3, f])
            torch.testing.assert_close(out[2, f], out[0, f] + out[1, f])
        else:  # they answer nothing
            assert torch.all(out[1, f] == 0) and torch.all(out[3, f] == 0)
            torch.testing.assert_close(out[2, f], out[0, f])
    rows = [len(k) + 1 for k in plan.keys]
    stored = {3: 4, 8: 8, 5: 8, 1: 4}
    row_bytes = sum(n * (stored[w] + 1) * 4 for n, w in zip(rows, plan.widths))  # rows + Adagrad state
    column_masks = (2 * 4 + 2 * 8) * 4  # [fields, stored width] per kernel: widths 3, 1 in 4; 8, 5 in 8
    assert table.memory_bytes() == row_bytes + sum(8 * len(k) for k in plan.keys) + column_masks
    assert compact_bytes([len(k) for k in plan.keys], plan.widths) == table.memory_bytes()  # the search's limit
    forms = table.to_serving()
    assert [f.tensors["rows"].shape[1] for f in forms] == plan.widths
    assert [("projection" in f.tensors) for f in forms] == [True, False, True, True]


def test_plan_errors_name_the_option_and_file(tiny_root, tmp_path):
    def build(path):
        cfg = TableConfig(kind="optembed", embedding_dim=D, options={"plan": str(path)})
        return build_tables([cfg], SCHEMA.sparse, tiny_root)

    with pytest.raises(ConfigError, match=r"model.tables.0.options.plan: .*missing.pt: no such plan file"):
        build(tmp_path / "missing.pt")
    bad = _plan(tiny_root, [3, 9, 5, 1], [True] * 4)
    bad.save(tmp_path / "wide.pt")
    with pytest.raises(ConfigError, match=r"widths \[3, 9, 5, 1\] are not 4 integers in 1..8"):
        build(tmp_path / "wide.pt")
    unsorted = _plan(tiny_root, [3, 8, 5, 1], [True] * 4)
    unsorted.keys[2] = unsorted.keys[2].flip(0)
    unsorted.save(tmp_path / "unsorted.pt")
    with pytest.raises(ConfigError, match="keys of 'C3' are not strictly ascending"):
        build(tmp_path / "unsorted.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a plan")
    with pytest.raises(ConfigError, match="junk.pt: not a plan"):
        build(tmp_path / "junk.pt")
    with pytest.raises(ConfigError, match="model.tables.0.options.max_bytes: -1 is out of range"):
        build_tables([TableConfig(kind="optembed", embedding_dim=D, options={"max_bytes": -1})],
                     SCHEMA.sparse, tiny_root)


def test_the_supernet_digest_takes_empty_tensors_of_any_stride():
    from recmem.train.optembed import _digest

    strided = torch.zeros(0, dtype=torch.long).as_strided((0,), (0,))  # a field that kept no row, as loaded
    assert _digest({"a": strided, "b": torch.ones(3)}) == _digest({"a": torch.zeros(0, dtype=torch.long), "b": torch.ones(3)})
    assert _digest({"a": strided, "b": torch.ones(3)}) != _digest({"b": torch.ones(3)})
    assert _digest({"b": torch.ones(3)}) != _digest({"b": torch.ones(3).double()})
