"""`optembed`: OptEmbed (Lyu et al., "OptEmbed: Learning Optimal Embedding Table for Click-through
Rate Prediction", CIKM 2022): learned row pruning and a per-field width search, in three phases.

1. **Supernet** (``supernet.py``): every field's rows at full width D; a row is kept when its L1
   norm exceeds its field's learned threshold (OptEmbed-E), and each sample's field uses a random
   prefix width 1..D (OptEmbed-D's supernet). The loss gains ``alpha * sum_f exp(-t_f)``.
2. **Search** (``recmem/train/evolution.py``): an evolutionary search over per-field widths, each
   candidate scored by the supernet's validation AUC under those widths.
3. **Retrain** (``compact.py``): a fresh table of only the kept rows at the found widths.

``recmem optembed --config ...`` runs the three (``recmem/train/optembed.py``). A block without
``options.plan`` is the supernet; with it, the retrained table the plan describes. One Ray worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from recmem.config import FRACTION, NON_NEGATIVE, POSITIVE, ConfigError, TableConfig, checked, from_dict
from recmem.tables.base import check_width
from recmem.tables.optembed.compact import CompactTable, Plan, compact_bytes
from recmem.tables.optembed.supernet import SupernetTable


@dataclass
class OptEmbedOptions:
    """``options`` of an ``optembed`` block, by phase.

    Attributes:
        min_count: IDs seen fewer times than this in the training split share the OOV row (as `full`).
        alpha: (supernet) weight of the threshold regulariser ``sum_f exp(-t_f)``.
        threshold_lr: (supernet) the thresholds' Adam step size (the paper's lr_t).
        threshold_init: (supernet) every field's threshold at the start.
        sample_widths: (supernet) draw a width per sample and field in training; false trains at
            full width (OptEmbed-E alone, the paper's ablation; the search then scores widths the
            supernet never trained at).
        population: (search) random candidates to start from.
        top_k: (search) the best candidates so far that parent each generation.
        mutations: (search) children per generation by mutation.
        crossovers: (search) children per generation by crossover.
        mutation_prob: (search) the chance each field's width is redrawn in a mutation.
        iterations: (search) generations.
        search_batches: (search) validation batches scoring each candidate; 0: the whole split.
        max_bytes: (search) keep only candidates whose retrained table would hold at most this
            many bytes (``compact.compact_bytes``: the kept rows at the candidate's widths); 0: no
            limit (the paper's search).
        plan: (retrain) the plan file the search wrote; set, the block is the retrained table.
    """

    min_count: int = checked(1, NON_NEGATIVE)
    alpha: float = checked(1e-4, NON_NEGATIVE)
    threshold_lr: float = checked(1e-2, POSITIVE)
    threshold_init: float = 0.0
    sample_widths: bool = True
    population: int = checked(20, POSITIVE)
    top_k: int = checked(15, POSITIVE)
    mutations: int = checked(10, NON_NEGATIVE)
    crossovers: int = checked(10, NON_NEGATIVE)
    mutation_prob: float = checked(0.1, FRACTION)
    iterations: int = checked(30, NON_NEGATIVE)
    search_batches: int = checked(0, NON_NEGATIVE)
    max_bytes: int = checked(0, NON_NEGATIVE)
    plan: str = ""


def optembed_options(cfg: TableConfig, where: str) -> OptEmbedOptions:
    """The block's options, checked (``where``: the block's dotted key)."""
    return from_dict(OptEmbedOptions, cfg.options, f"{where}.options")


class OptEmbedTable:
    """Builds an ``optembed`` block: the supernet, or the compact retrained table its plan names."""

    @classmethod
    def from_config(cls, cfg: TableConfig, feature_names: list[str], seed: int, data_root: Path, where: str,
                    output_dim: int | None = None) -> SupernetTable | CompactTable:
        """Build from a table block (``options``: :class:`OptEmbedOptions`); vocabularies from the
        statistics, or the kept IDs from ``options.plan`` (a relative path is the working folder's).

        Raises:
            ConfigError: naming the key: bad options, a storage width other than the model's, a
                ``num_embeddings``, or a plan file that is missing or does not fit the block.
        """
        from recmem.data.stats import load_ids

        check_width(cfg, where, output_dim)
        options = optembed_options(cfg, where)
        if cfg.num_embeddings:
            raise ConfigError(f"{where}.num_embeddings: optembed tables are sized by the statistics")
        if options.plan:
            try:
                plan = Plan.load(Path(options.plan), feature_names, cfg.embedding_dim, f"{where}.options.plan")
            except ValueError as e:
                raise ConfigError(str(e)) from None
            return CompactTable(plan, cfg.embedding_dim, cfg.learning_rate, seed)
        vocabs = [load_ids(data_root, f, options.min_count) for f in feature_names]
        return SupernetTable(feature_names, vocabs, cfg.embedding_dim, cfg.learning_rate, options.alpha,
                             options.threshold_lr, options.threshold_init, seed, options.sample_widths)


__all__ = ["CompactTable", "OptEmbedOptions", "OptEmbedTable", "Plan", "SupernetTable", "compact_bytes",
           "optembed_options"]
