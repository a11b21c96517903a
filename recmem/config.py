"""Typed, strict configuration: dataclasses loaded from YAML with ``a.b=value`` overrides.

Every section is a dataclass with defaults, so an empty YAML file is a working config (the embedded
quickstart). Unknown keys, wrong types and missing files raise :class:`ConfigError` naming the dotted
path (``train.lr``) or the file. Builders elsewhere turn these into plain constructor arguments; no
class body ever reads a config object.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

CRITEO_DENSE = [f"I{i}" for i in range(1, 14)]
CRITEO_SPARSE = [f"C{i}" for i in range(1, 27)]


class ConfigError(ValueError):
    """A bad config: the message names the file or the dotted key at fault."""


@dataclass
class SchemaConfig:
    """Which columns of a click log mean what. Criteo's layout is the default."""

    label: str = "label"
    dense: list[str] = field(default_factory=lambda: list(CRITEO_DENSE))
    sparse: list[str] = field(default_factory=lambda: list(CRITEO_SPARSE))
    event_time: str | None = "event_time"
    true_prob: str | None = "true_prob"


@dataclass
class RawConfig:
    """A raw click log (Criteo TSV, CSV) to convert into Parquet with ``recmem prepare``.

    ``columns`` names the raw columns (default: the header if ``header``, else label + dense +
    sparse). ``hex_ids`` parses categories as hex integers (Criteo), else hashes them. The last
    ``valid_rows`` rows (or ``valid_fraction`` when 0) form the valid split. ``time_format`` is a
    strptime format for the event-time column (e.g. ``%y%m%d%H`` for Avazu's ``hour``); empty means
    integer seconds. Each Parquet part holds at most ``part_rows`` rows.
    """

    path: str = ""
    delimiter: str = "\t"
    header: bool = False
    columns: list[str] = field(default_factory=list)
    hex_ids: bool = True
    valid_rows: int = 0
    valid_fraction: float = 0.1
    chunk_rows: int = 200_000
    max_bad_fraction: float = 0.01
    time_format: str = ""
    part_rows: int = 1_000_000


# Criteo Kaggle (DAC) distinct values of C1..C26 and missing fraction of I1..I13: the shape the
# synthetic generator imitates.
CRITEO_CARDINALITIES = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]
CRITEO_DENSE_MISSING = [
    0.448, 0.0, 0.204, 0.198, 0.049, 0.251, 0.049, 0.001, 0.049, 0.448, 0.049, 0.774, 0.198,
]


@dataclass
class SyntheticConfig:
    """recmem's Criteo-shaped generator (``recmem generate``); the defaults are the quickstart data.

    Field sizes: a cardinality ``c`` above ``cardinality_pivot`` becomes
    ``pivot * (c / pivot) ** cardinality_exponent`` (10M -> ~320k at the defaults). ID lifetimes:
    the slot of popularity rank r keeps an ID ``max(min_lifetime_days, head_lifetime_days *
    r ** -lifetime_exponent)`` days. An ID's first-order effect and latent vector are scaled by
    ``share / (share + effect_half_share)`` and ``share / (share + interaction_half_share)``, share
    being its expected share of its field's rows, so rare IDs carry little signal. The four ``*_std``
    are the standard deviations over rows of the logit's four terms (first-order, pairwise latent
    interactions, dense, dense x sparse). The defaults give an oracle valid AUC near 0.80 and a
    positive rate of 0.25. See ``recmem.data.synthetic``.
    """

    train_rows: int = 600_000
    valid_rows: int = 100_000
    seed: int = 0
    chunk_rows: int = 100_000
    num_days: int = 7
    start_time: int = 1_704_067_200
    diurnal_amplitude: float = 0.5
    cardinalities: list[int] = field(default_factory=lambda: list(CRITEO_CARDINALITIES))
    cardinality_pivot: int = 10_000
    cardinality_exponent: float = 0.5
    zipf_exponent: float = 1.3
    head_lifetime_days: float = 1000.0
    lifetime_exponent: float = 1.0
    min_lifetime_days: float = 1.0
    dense_missing: list[float] = field(default_factory=lambda: list(CRITEO_DENSE_MISSING))
    positive_rate: float = 0.25
    latent_dim: int = 4
    first_order_std: float = 1.1
    interaction_std: float = 0.56
    dense_std: float = 0.45
    dense_interaction_std: float = 0.2
    effect_half_share: float = 3e-2
    interaction_half_share: float = 3e-2
    field_importance_spread: float = 1.0
    interaction_cardinality_exponent: float = 0.5


@dataclass
class DataConfig:
    """Where the Parquet lives and how it is read.

    ``root`` holds ``train/``, ``valid/`` (Parquet parts) and ``stats/`` (feature statistics).
    """

    root: str = "data/synthetic"
    schema: SchemaConfig = field(default_factory=SchemaConfig)
    raw: RawConfig = field(default_factory=RawConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    batch_size: int = 4096


@dataclass
class TableConfig:
    """One block of tables: every listed feature gets its own table of this kind.

    ``feature_names`` empty means every sparse feature not claimed by an earlier block. ``options``
    holds the kind's own knobs, checked against that kind's options dataclass when it is built.
    """

    kind: str = "full"
    embedding_dim: int = 16
    feature_names: list[str] = field(default_factory=list)
    num_embeddings: int = 0
    learning_rate: float = 0.05
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    """The dense architecture and the tables it sits on."""

    arch: Literal["dlrm", "dcnv2"] = "dlrm"
    bottom_mlp: list[int] = field(default_factory=lambda: [512, 256, 16])
    top_mlp: list[int] = field(default_factory=lambda: [512, 256, 1])
    cross_layers: int = 3
    tables: list[TableConfig] = field(default_factory=lambda: [TableConfig()])


@dataclass
class TrainConfig:
    """The training loop. ``device``: where the dense layers run; ``cuda`` gives each process (each
    Ray worker) one GPU and NCCL for their all-reduce, while the tables stay in host memory.
    ``precision``: the dense layers' arithmetic; ``bf16`` runs them under bf16 autocast (fp32 master
    weights), ``auto`` takes bf16 only where the device computes it natively (a CPU with AVX512-BF16
    or AMX, a GPU with bf16 support), else fp32 (see ``recmem/train/device.py``).

    ``nonfinite``: what a step with a non-finite loss does; ``stop`` ends the run with an error naming
    the step, ``skip`` leaves the batch out (no update) and counts it, ending the run once more than
    ``max_skipped_batches`` were skipped. ``resume_changed: true`` resumes a checkpoint although the
    training data or the model config changed since it was written (each difference is printed);
    by default such a resume is refused before the first step."""

    epochs: int = 1
    max_steps: int = 0
    dense_optimizer: Literal["adagrad", "adam", "sgd"] = "adagrad"
    learning_rate: float = 0.01
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    eval_every: int = 0
    log_every: int = 20
    checkpoint_every: int = 0
    checkpoint_dir: str = "runs/checkpoints"
    resume: bool = True
    resume_changed: bool = False
    nonfinite: Literal["stop", "skip"] = "stop"
    max_skipped_batches: int = 10
    evict_every: int = 0
    device: Literal["cpu", "cuda"] = "cpu"
    progress: bool = True


@dataclass
class TrackingConfig:
    """MLflow. Empty ``tracking_uri`` means ``MLFLOW_TRACKING_URI`` or the local SQLite store.

    ``verbose`` lets the libraries' own console output through, for debugging: Ray's and Ray Train's
    logs, fbgemm's and torchrec's logs, MLflow's, library warnings. Off,
    a run prints recmem's progress, its MLflow run and its summary, and whatever goes wrong.
    """

    tracking_uri: str = ""
    experiment: str = "recmem"
    run_name: str = ""
    enabled: bool = True
    verbose: bool = False


@dataclass
class RayConfig:
    """Ray: where ``recmem train`` runs, on how many workers, and how tables are split over them.

    ``enabled: false`` runs the plain single-process loop instead (tests, benchmarks). An empty
    ``address`` means ``RAY_ADDRESS`` when set, else an embedded local Ray with ``num_cpus`` CPUs
    (0: every core). Each of the ``num_workers`` workers reserves ``cpus_per_worker`` for Ray's
    scheduler (fractions pack more workers on a node) and reads its own data (no CPU goes to separate
    readers). ``torch_threads`` 0 gives each worker its node's cores shared evenly among the workers
    on that node; the choice is printed and logged as ``ray.torch_threads_used``. Checkpoints
    go to ``storage_path`` (a folder or a pyarrow/fsspec URI such as ``s3://bucket/runs``; empty:
    ``<workdir>/<train.checkpoint_dir>/ray``) under ``run_name``; ``train.resume: false`` starts a
    fresh run name. A failed worker group is restarted from the latest checkpoint up to
    ``max_failures`` times. ``sharding`` (see ``recmem/train/distributed/plan.py``): ``auto`` lets
    TorchRec's planner shard ``full``/``hash`` tables table- or row-wise and ID-shards other kinds;
    ``table_wise`` / ``row_wise`` / ``column_wise`` force that TorchRec layout; ``id`` deals every
    table's rows to workers by key with an all-to-all exchange (every kind). ``measure_traffic``
    counts the bytes each worker sends per step (``recmem/train/distributed/traffic.py``) and logs
    them as ``traffic/*`` metrics at each validation; off, no collective is wrapped.
    """

    enabled: bool = True
    address: str = ""
    num_cpus: int = 0
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    torch_threads: int = 0
    storage_path: str = ""
    run_name: str = "recmem"
    max_failures: int = 2
    sharding: Literal["auto", "id", "table_wise", "row_wise", "column_wise"] = "auto"
    measure_traffic: bool = False


@dataclass
class Config:
    """The whole job."""

    seed: int = 0
    workdir: str = "."
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)


def from_dict(cls: Any, data: Any, path: str = "") -> Any:
    """Build ``cls`` (a dataclass, container or scalar type) from plain YAML data, strictly.

    Raises:
        ConfigError: naming the dotted ``path`` of an unknown key or a value of the wrong type.
    """
    where = path or "<root>"
    origin = typing.get_origin(cls)
    if dataclasses.is_dataclass(cls):
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{_join(path, unknown[0])}: unknown key (known: {', '.join(sorted(names))})")
        kwargs = {k: from_dict(hints[k], v, _join(path, k)) for k, v in data.items()}
        return cls(**kwargs)
    if cls is Any:
        return data
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(cls)
        if data is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return from_dict(arg, data, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        allowed = typing.get_args(cls)
        if data not in allowed:
            raise ConfigError(f"{where}: {data!r} is not one of {list(allowed)}")
        return data
    if origin is list:
        if not isinstance(data, list):
            raise ConfigError(f"{where}: expected a list, got {type(data).__name__}")
        (item,) = typing.get_args(cls)
        return [from_dict(item, v, f"{where}.{i}") for i, v in enumerate(data)]
    if origin is dict:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
        _, value_type = typing.get_args(cls)
        return {str(k): from_dict(value_type, v, _join(path, str(k))) for k, v in data.items()}
    return _scalar(cls, data, where)


def _scalar(cls: type, data: Any, where: str) -> Any:
    if cls is float and isinstance(data, int) and not isinstance(data, bool):
        return float(data)
    if cls is int and isinstance(data, bool) or not isinstance(data, cls):
        raise ConfigError(f"{where}: expected {cls.__name__}, got {data!r} ({type(data).__name__})")
    return data


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain data (for YAML dumps and MLflow params)."""
    return dataclasses.asdict(cfg)


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to raw config data in place."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key=value, e.g. train.lr=0.01")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_index(node, part, parts[: i + 1])]
        else:
            node = node.setdefault(part, {})
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(node, list):
        node[_index(node, parts[-1], parts)] = value
    elif isinstance(node, dict):
        node[parts[-1]] = value
    else:
        raise ConfigError(f"{key}: {'.'.join(parts[:-1])} is not a section")


def _index(node: list, part: str, parts: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"{'.'.join(parts)}: no list item {part!r} (the list has {len(node)})")
    return int(part)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Load a YAML config, apply ``key=value`` overrides, and check it strictly.

    Args:
        path: a YAML file, or None for the embedded defaults.
        overrides: ``a.b=value`` strings applied after the file.

    Raises:
        ConfigError: a missing or unparsable file, an unknown key, or a wrong type.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
    data = _with_default_tables(data)
    for override in overrides:
        apply_override(data, override)
    try:
        return from_dict(Config, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def _with_default_tables(data: dict[str, Any]) -> dict[str, Any]:
    """Materialise the default table list so ``model.tables.0.kind=hash`` overrides work."""
    model = data.setdefault("model", {}) if isinstance(data, dict) else {}
    if isinstance(model, dict) and "tables" not in model:
        model["tables"] = [{}]
    return data
