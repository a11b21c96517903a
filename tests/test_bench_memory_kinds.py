"""The memory-kinds benchmark's harness (``recmem/bench/memory_kinds.py``): every variant builds on a
tiny root (a concatenating ``multihash`` too: k rows of width D / k), and the report
lines up whatever the variants' names."""

from __future__ import annotations

import torch

from recmem.bench.memory_kinds import VARIANTS, KindFigures, _model, report
from tests.conftest import tiny_config


def test_every_variant_builds_at_the_models_width_and_the_report_lines_up(tiny_root, tmp_path):
    cfg = tiny_config(tiny_root, tmp_path, "model.tables.0.embedding_dim=16",
                      "model.bottom_mlp=[32,16]")  # concat of 4: rows of width 4
    for block in VARIANTS.values():  # build_model refuses a block whose output is not the model's width
        _model(cfg, block)
    lines = report({n: KindFigures(1 << 20, 1.0, 1000.0) for n in ("full", "multihash_k4_concat_c16")}, cfg)
    rows = lines.splitlines()[1:]
    assert len({len(r) for r in rows}) == 1 and torch.backends.cpu.get_cpu_capability() in lines
