"""Bytes per ID and training speed of the memory-efficient table kinds against `full` (issue 11).

Every variant is recmem's DLRM (the config's dense part) on one kind of table over every sparse
feature of a prepared data root, built as ``recmem train`` builds it. Memory is the tables' own
``memory_bytes()`` (measured from the live tensors: rows, optimizer state, projections, ID maps),
divided by the IDs of the training split's vocabularies (every distinct ID in the statistics), so
``full`` at ``min_count: 1`` costs about ``4 * (D + 1) + 8`` bytes per ID. Speed: the training loop's
step (``throughput.make_step`` with the table's auxiliary loss) over the same batches read from the
training split, the variants interleaved in rounds (``throughput.interleave``), in one process.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from pathlib import Path

import torch

from recmem.bench.throughput import ThroughputOptions, interleave, make_step
from recmem.config import Config, TableConfig
from recmem.data.dataset import iter_batches
from recmem.models import CTRModel, build_model
from recmem.train.loop import make_dense_optimizer

VARIANTS: dict[str, TableConfig] = {
    "full": TableConfig(kind="full"),
    "qr_c4": TableConfig(kind="qr", options={"collisions": 4}),
    "qr_c16": TableConfig(kind="qr", options={"collisions": 16}),
    "qr_c64": TableConfig(kind="qr", options={"collisions": 64}),
    # frequency-aware full: IDs seen fewer than 8 / 64 times share 256 hashed rows per feature
    "full_mc8_b256": TableConfig(kind="full", options={"min_count": 8, "oov_buckets": 256}),
    "full_mc64_b256": TableConfig(kind="full", options={"min_count": 64, "oov_buckets": 256}),
    # multihash: 2 hashed rows per ID (summed, k indices per ID in the fused kernel) in distinct IDs / c rows
    "multihash_k2_c4": TableConfig(kind="multihash", options={"num_hashes": 2, "compression": 4}),
    "multihash_k2_c16": TableConfig(kind="multihash", options={"num_hashes": 2, "compression": 16}),
    "multihash_k2_c64": TableConfig(kind="multihash", options={"num_hashes": 2, "compression": 64}),
    # the frontier's multihash sizing: 4 hashed rows of width D/4 per ID, concatenated
    "multihash_k4_concat_c16": TableConfig(kind="multihash", options={"num_hashes": 4, "combine": "concat",
                                                                      "compression": 16}),
    # mixed_dim: d0 = the block's width, d_i = d0 * (n_min / n_i) ** alpha (p2: rounded down to powers of two)
    "mixed_dim_a03": TableConfig(kind="mixed_dim", options={"alpha": 0.3}),
    "mixed_dim_a05p2": TableConfig(kind="mixed_dim", options={"alpha": 0.5, "power_of_two": True}),
    # optembed's supernet (phase 1: each ID's row through its threshold mask, widths drawn per sample);
    # the retrained tables need the plan `recmem optembed` writes: jobs/bench_memory_kinds.py --optembed-plan
    "optembed_supernet": TableConfig(kind="optembed"),
}
"""Each variant's table block (its ``embedding_dim`` and ``learning_rate`` come from the config's first)."""


@dataclass
class KindFigures:
    """One variant: table bytes, bytes per vocabulary ID, samples/s, and their ratios to `full`."""

    memory_bytes: int
    bytes_per_id: float
    samples_per_second: float
    memory_ratio: float = 1.0
    speed_ratio: float = 1.0


def _model(cfg: Config, block: TableConfig) -> CTRModel:
    base = cfg.model.tables[0]
    table = copy.deepcopy(block)
    table.embedding_dim, table.learning_rate = base.embedding_dim, base.learning_rate
    model_cfg = copy.deepcopy(cfg.model)
    if table.options.get("combine") == "concat":  # k rows of width D / k make the model's width D
        model_cfg.embedding_dim = base.embedding_dim
        table.embedding_dim = base.embedding_dim // table.options["num_hashes"]
    model_cfg.tables = [table]
    return build_model(model_cfg, cfg.data.schema, Path(cfg.data.root), cfg.seed)


def _step(model: CTRModel, cfg: Config):
    optimizer = make_dense_optimizer(cfg, model.dense_parameters())

    def loss_of(batch):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch.labels)
        aux = model.tables.auxiliary_loss()
        return loss if aux is None else loss + aux

    return make_step(loss_of, optimizer)


def vocabulary_ids(cfg: Config) -> int:
    """Distinct IDs of every sparse feature in the training split's statistics."""
    from recmem.data.stats import load_ids

    return sum(len(load_ids(Path(cfg.data.root), f, 1)) for f in cfg.data.schema.sparse)


def measure(cfg: Config, variants: dict[str, TableConfig], opts: ThroughputOptions) -> dict[str, KindFigures]:
    """Figures of each variant (``full`` first, the yardstick) on ``cfg``'s data and batch size."""
    batches = list(itertools.islice(iter_batches(Path(cfg.data.root), "train", cfg.data.schema, cfg.data.batch_size,
                                                 drop_last=True),
                                    opts.warmup + opts.steps))
    models = {name: _model(cfg, block) for name, block in variants.items()}
    timings = interleave({name: _step(m, cfg) for name, m in models.items()}, batches, opts)
    ids = vocabulary_ids(cfg)
    out = {}
    for name, model in models.items():
        memory = model.tables.memory_bytes()
        out[name] = KindFigures(memory, memory / ids, timings[name].samples_per_second)
    base = out.get("full")
    if base is not None:
        for figures in out.values():
            figures.memory_ratio = base.memory_bytes / figures.memory_bytes
            figures.speed_ratio = figures.samples_per_second / base.samples_per_second
    return out


def report(figures: dict[str, KindFigures], cfg: Config) -> str:
    """A table of the figures, with the CPU's vector capability beside the speeds."""
    width = max(len("variant"), *map(len, figures)) + 2
    lines = [f"batch {cfg.data.batch_size}, D={cfg.model.tables[0].embedding_dim}, "
             f"cpu capability {torch.backends.cpu.get_cpu_capability()}, torch threads {torch.get_num_threads()}",
             f"{'variant':<{width}}{'table MiB':>11}{'bytes/ID':>10}{'x smaller':>11}{'samples/s':>12}{'x full':>8}"]
    for name, f in figures.items():
        lines.append(f"{name:<{width}}{f.memory_bytes / 2**20:>11.2f}{f.bytes_per_id:>10.1f}{f.memory_ratio:>11.1f}"
                     f"{f.samples_per_second:>12,.0f}{f.speed_ratio:>8.2f}")
    return "\n".join(lines)
