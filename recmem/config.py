"""Typed, strict configuration: dataclasses loaded from YAML with ``a.b=value`` overrides.

Every section is a dataclass with defaults, so an empty YAML file is a working config (the embedded
quickstart). Unknown keys, wrong types and missing files raise :class:`ConfigError` naming the dotted
path (``train.lr``) or the file. Numeric fields carry their allowed :class:`Range` and some fields
must not be empty (``checked`` in the field's metadata); rules across fields are in ``_check_rules``.
Both are enforced at load time, so a value that cannot work (a batch of 0 rows, a negative learning
rate) fails before any data is read, naming the key, the value and what is allowed. YAML reads as
PyYAML's safe loader reads it, except that ``1e-3`` is a float and a key given twice is an error.
Builders elsewhere turn these into plain constructor arguments; no class body ever reads a config
object.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\- ]{0,255}")
"""A registered model's name as recmem takes it (no ``/`` or quotes, which would break ``models:/`` URIs
and registry searches)."""

CRITEO_DENSE = [f"I{i}" for i in range(1, 14)]
CRITEO_SPARSE = [f"C{i}" for i in range(1, 27)]


class ConfigError(ValueError):
    """A bad config: the message names the file or the dotted key at fault."""


@dataclass(frozen=True)
class Range:
    """The numbers a field allows: above ``low`` and below ``high`` (either may be None), each bound
    inclusive unless ``*_open``. Printed as the rule it states (``> 0``, ``in [0, 1)``)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, x: float) -> bool:
        above = self.low is None or x > self.low or (x == self.low and not self.low_open)
        below = self.high is None or x < self.high or (x == self.high and not self.high_open)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1)


def checked(default: Any = dataclasses.MISSING, allowed: Range | None = None, *, factory: Any = dataclasses.MISSING,
            non_empty: bool = False) -> Any:
    """A dataclass field whose value (each item, for a list) must lie in ``allowed``, and which must
    not be empty (a list or a string) if ``non_empty``; :func:`from_dict` enforces both."""
    return field(default=default, default_factory=factory, metadata={"allowed": allowed, "non_empty": non_empty})


@dataclass
class SchemaConfig:
    """Which columns of a click log mean what. Criteo's layout is the default."""

    label: str = checked("label", non_empty=True)
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
    delimiter: str = checked("\t", non_empty=True)
    header: bool = False
    columns: list[str] = field(default_factory=list)
    hex_ids: bool = True
    valid_rows: int = checked(0, NON_NEGATIVE)
    valid_fraction: float = checked(0.1, FRACTION)
    chunk_rows: int = checked(200_000, POSITIVE)
    max_bad_fraction: float = checked(0.01, FRACTION)
    time_format: str = ""
    part_rows: int = checked(1_000_000, POSITIVE)


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
    being its expected share of its field's rows, so rare IDs carry little signal. With
    ``effect_half_rows`` (``interaction_half_rows``) above 0 the half point is counted in rows
    instead: an ID expected in that many training rows gets half its effect, so tail IDs seen a few
    dozen times keep their own effects (what makes hash collisions cost AUC). The four ``*_std``
    are the standard deviations over rows of the logit's four terms (first-order, pairwise latent
    interactions, dense, dense x sparse). The defaults give an oracle valid AUC near 0.80 and a
    positive rate of 0.25. See ``recmem.data.synthetic``.
    """

    train_rows: int = checked(600_000, POSITIVE)
    valid_rows: int = checked(100_000, NON_NEGATIVE)
    seed: int = checked(0, NON_NEGATIVE)  # numpy takes no negative seed
    chunk_rows: int = checked(100_000, POSITIVE)
    num_days: int = checked(7, POSITIVE)
    start_time: int = 1_704_067_200
    diurnal_amplitude: float = checked(0.5, Range(0, 1, high_open=True))  # the row rate never reaches 0
    cardinalities: list[int] = checked(factory=lambda: list(CRITEO_CARDINALITIES), allowed=POSITIVE)
    cardinality_pivot: int = checked(10_000, POSITIVE)
    cardinality_exponent: float = checked(0.5, NON_NEGATIVE)
    zipf_exponent: float = checked(1.3, NON_NEGATIVE)
    head_lifetime_days: float = checked(1000.0, POSITIVE)
    lifetime_exponent: float = checked(1.0, NON_NEGATIVE)
    min_lifetime_days: float = checked(1.0, POSITIVE)  # the generator divides by lifetimes
    dense_missing: list[float] = checked(factory=lambda: list(CRITEO_DENSE_MISSING), allowed=FRACTION)
    positive_rate: float = checked(0.25, Range(0, 1, low_open=True, high_open=True))
    latent_dim: int = checked(4, POSITIVE)
    first_order_std: float = checked(1.1, NON_NEGATIVE)
    interaction_std: float = checked(0.56, NON_NEGATIVE)
    dense_std: float = checked(0.45, NON_NEGATIVE)
    dense_interaction_std: float = checked(0.2, NON_NEGATIVE)
    effect_half_share: float = checked(3e-2, POSITIVE)  # 0 makes share / (share + 0) 0 / 0 for a dead ID
    interaction_half_share: float = checked(3e-2, POSITIVE)
    effect_half_rows: float = checked(0.0, NON_NEGATIVE)  # 0: effect_half_share decides
    interaction_half_rows: float = checked(0.0, NON_NEGATIVE)  # 0: interaction_half_share decides
    field_importance_spread: float = checked(1.0, NON_NEGATIVE)
    interaction_cardinality_exponent: float = checked(0.5, NON_NEGATIVE)


@dataclass
class DataConfig:
    """Where the Parquet lives and how it is read.

    ``root`` holds ``train/``, ``valid/`` (Parquet parts) and ``stats/`` (feature statistics).
    """

    root: str = "data/synthetic"
    schema: SchemaConfig = field(default_factory=SchemaConfig)
    raw: RawConfig = field(default_factory=RawConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    batch_size: int = checked(4096, POSITIVE)


@dataclass
class TableConfig:
    """One block of tables: every listed feature gets its own table of this kind.

    ``feature_names`` empty means every sparse feature not claimed by an earlier block. ``options``
    holds the kind's own knobs, checked against that kind's options dataclass when it is built.
    """

    kind: str = "full"
    embedding_dim: int = checked(16, POSITIVE)
    feature_names: list[str] = field(default_factory=list)
    num_embeddings: int = checked(0, NON_NEGATIVE)
    learning_rate: float = checked(0.05, POSITIVE)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    """The dense architecture and the tables it sits on.

    ``embedding_dim`` is the width of every pooled embedding the dense part sees (the model's output
    width of its tables); 0 takes the tables' ``embedding_dim``, which every block must then share.
    A block's own ``embedding_dim`` is its storage width: kinds that store narrower or compositional
    rows (``qr`` with concat) map them to the model's width; the others must equal it.
    """

    arch: Literal["dlrm", "dcnv2"] = "dlrm"
    embedding_dim: int = checked(0, NON_NEGATIVE)
    bottom_mlp: list[int] = checked(factory=lambda: [512, 256, 16], allowed=POSITIVE, non_empty=True)
    top_mlp: list[int] = checked(factory=lambda: [512, 256, 1], allowed=POSITIVE, non_empty=True)
    cross_layers: int = checked(3, NON_NEGATIVE)
    tables: list[TableConfig] = checked(factory=lambda: [TableConfig()], non_empty=True)


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
    by default such a resume is refused before the first step.

    ``register_as``: after a successful run, export the final checkpoint as an fp32 serving bundle
    and register it as a new version of this MLflow registered model (``recmem/registry.py``); empty:
    no registration. A failed registration keeps the checkpoint and says what failed in one line.

    ``prefetch_batches``: how many batches ahead of the step the loop hands to tables that prefetch
    their rows (``ssd``), see ``recmem/train/lookahead.py``; 0 fetches each batch's rows as it comes."""

    epochs: int = checked(1, POSITIVE)
    max_steps: int = checked(0, NON_NEGATIVE)
    dense_optimizer: Literal["adagrad", "adam", "sgd"] = "adagrad"
    learning_rate: float = checked(0.01, POSITIVE)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    eval_every: int = checked(0, NON_NEGATIVE)
    log_every: int = checked(20, NON_NEGATIVE)
    checkpoint_every: int = checked(0, NON_NEGATIVE)
    checkpoint_dir: str = "runs/checkpoints"
    resume: bool = True
    resume_changed: bool = False
    nonfinite: Literal["stop", "skip"] = "stop"
    max_skipped_batches: int = checked(10, NON_NEGATIVE)
    evict_every: int = checked(0, NON_NEGATIVE)
    prefetch_batches: int = checked(2, Range(0, 64))
    device: Literal["cpu", "cuda"] = "cpu"
    progress: bool = True
    register_as: str = ""


@dataclass
class TrackingConfig:
    """MLflow. Empty ``tracking_uri`` means ``MLFLOW_TRACKING_URI`` or the local SQLite store.

    ``verbose`` lets the libraries' own console output through, for debugging: Ray's logs,
    fbgemm's and torchrec's logs, MLflow's, library warnings. Off, a run prints recmem's progress,
    its MLflow run and its summary, and whatever goes wrong.
    """

    tracking_uri: str = ""
    experiment: str = checked("recmem", non_empty=True)
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
    num_cpus: int = checked(0, NON_NEGATIVE)
    num_workers: int = checked(1, POSITIVE)
    cpus_per_worker: float = checked(1.0, POSITIVE)
    torch_threads: int = checked(0, NON_NEGATIVE)
    storage_path: str = ""
    run_name: str = checked("recmem", non_empty=True)
    max_failures: int = checked(2, Range(-1))  # -1: retry forever
    sharding: Literal["auto", "id", "table_wise", "row_wise", "column_wise"] = "auto"
    measure_traffic: bool = False


@dataclass
class OnlineConfig:
    """``recmem online`` (``recmem/online/``): train on windows of a stream as they land.

    Producers land Parquet files in ``landing`` (a folder or a pyarrow filesystem URI), each written
    under a name starting with ``.`` and renamed when complete. Each window (a file, or
    ``window_rows`` rows of one; 0: a whole file) is scored, then trained on; checkpoints (in
    ``checkpoint_dir`` under the workdir) hold the model with the rows consumed. With nothing new the
    loop polls every ``poll_interval_s``; it exits after ``idle_exit_s`` idle seconds (0: never) or
    ``max_windows`` windows (0: no limit). ``endpoints`` are model servers (``http://host:port``) that
    get a row delta at most every ``sync_interval_s`` seconds (0: after every window), with the dense
    weights in every ``dense_every``-th delta (the first always has them). Every ``snapshot_every``
    windows (0: never) the newest checkpoint is registered as a version of ``register_as``, which
    becomes ``champion`` only if, on the last ``guardrail_windows`` windows, its AUC is at most
    ``max_auc_drop`` below the champion's and its calibration lies in ``calibration_range``
    ``[low, high]``; else serving is rolled back to the champion (``recmem/online/snapshot.py``).
    With ``ray.enabled`` and ``ray.num_workers > 1`` the windows train on Ray workers with sharded
    tables (``recmem/online/workers.py``); their checkpoints go to ``ray.storage_path`` (empty:
    ``<workdir>/<checkpoint_dir>/ray``) under ``ray.run_name``, and deltas need collisionless tables.
    """

    landing: str = "runs/landing"
    window_rows: int = checked(0, NON_NEGATIVE)
    checkpoint_dir: str = "runs/online"
    poll_interval_s: float = checked(0.5, POSITIVE)
    idle_exit_s: float = checked(0.0, NON_NEGATIVE)
    max_windows: int = checked(0, NON_NEGATIVE)
    endpoints: list[str] = field(default_factory=list)
    sync_interval_s: float = checked(1.0, NON_NEGATIVE)
    dense_every: int = checked(10, POSITIVE)
    register_as: str = ""
    snapshot_every: int = checked(0, NON_NEGATIVE)
    guardrail_windows: int = checked(5, POSITIVE)
    max_auc_drop: float = checked(0.005, FRACTION)
    calibration_range: list[float] = checked(factory=lambda: [0.8, 1.25], allowed=POSITIVE)


@dataclass
class Config:
    """The whole job."""

    seed: int = checked(0, NON_NEGATIVE)
    workdir: str = "."
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)


def from_dict(cls: Any, data: Any, path: str = "") -> Any:
    """Build ``cls`` (a dataclass, container or scalar type) from plain YAML data, strictly.

    Raises:
        ConfigError: naming the dotted ``path`` of an unknown key, a value of the wrong type, or one
            outside its field's ``checked`` range.
    """
    where = path or "<root>"
    origin = typing.get_origin(cls)
    if dataclasses.is_dataclass(cls):
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls)
        names = sorted(f.name for f in fields)
        unknown = [k for k in data if k not in names]
        if unknown:
            raise ConfigError(f"{_join(path, str(unknown[0]))}: unknown key (known: {', '.join(names)})")
        built = cls(**{k: from_dict(hints[k], v, _join(path, k)) for k, v in data.items()})
        for f in fields:  # defaults too, so a default can never drift out of its own range
            _check_field(f, getattr(built, f.name), _join(path, f.name))
        return built
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
    if cls is float and not math.isfinite(data):
        raise ConfigError(f"{where}: expected a finite number, got {data!r}")
    return data


def _check_field(f: dataclasses.Field, value: Any, where: str) -> None:
    """Enforce ``f``'s ``checked`` metadata on its built ``value`` (each item of a list)."""
    if f.metadata.get("non_empty") and not value:
        unit = "item" if isinstance(value, list) else "character"
        raise ConfigError(f"{where}: {value!r} is empty; it needs at least one {unit}")
    allowed = f.metadata.get("allowed")
    if allowed is None or value is None:
        return
    items = [(f"{where}.{i}", v) for i, v in enumerate(value)] if isinstance(value, list) else [(where, value)]
    for key, item in items:
        if item not in allowed:
            raise ConfigError(f"{key}: {item!r} is out of range (allowed: {allowed})")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain data (for YAML dumps and MLflow params)."""
    return dataclasses.asdict(cfg)


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to raw config data in place."""
    key, equals, raw = override.partition("=")
    parts = key.strip().split(".")
    if not equals or not all(parts):
        raise ConfigError(f"override {override!r}: expected key=value with a dotted key, e.g. train.epochs=2")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_index(node, part, parts[: i + 1])]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise ConfigError(f"{key}: {'.'.join(parts[:i])} is not a section")
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except (yaml.YAMLError, ConfigError) as e:
        raise ConfigError(f"override {override!r}: the value is not valid YAML: {_yaml_problem(e)}") from None
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


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``: a string)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def parse_yaml(text: str) -> Any:
    """YAML text -> plain data, with ``1e-3`` a float.

    Raises:
        yaml.YAMLError: text that is not YAML.
        ConfigError: a key given twice in one mapping, naming its dotted path and both lines.
    """
    loader = _YamlLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _reject_duplicate_keys(node, "")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _reject_duplicate_keys(node: yaml.Node, path: str) -> None:
    """PyYAML keeps the last of two equal keys silently; a config that says two things is refused."""
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _reject_duplicate_keys(item, _join(path, str(i)))
    elif isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                line = key.start_mark.line + 1
                if key.value in lines:
                    raise ConfigError(f"{_join(path, key.value)}: duplicate key on line {line} "
                                      f"(first on line {lines[key.value]})")
                lines[key.value] = line
                _reject_duplicate_keys(value, _join(path, key.value))


def _yaml_problem(e: Exception) -> str:
    """A YAML error on one line: where it is and what is wrong."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return where + " ".join(str(getattr(e, "problem", None) or e).split())


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Load a YAML config, apply ``key=value`` overrides, and check it strictly.

    Args:
        path: a YAML file, or None for the embedded defaults.
        overrides: ``a.b=value`` strings applied after the file.

    Raises:
        ConfigError: a missing or unparsable file, a duplicate, unknown or mistyped key, a value out of
            its range, or fields that contradict each other (see ``_check_rules``); one line each.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            data = parse_yaml(p.read_text()) or {}
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: cannot read it as text: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {_yaml_problem(e)}") from None
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
    data = _with_default_tables(data)
    for override in overrides:
        apply_override(data, override)
    try:
        cfg = from_dict(Config, data)
        _check_rules(cfg)
        return cfg
    except ConfigError as e:
        origin = _origin(str(e), path, overrides)
        raise ConfigError(f"{origin}: {e}" if origin else str(e)) from None


def _origin(message: str, path: str | Path | None, overrides: list[str]) -> str:
    """Where the values an error names came from: the last override that set a key it names (or a
    section above one), else the file."""
    for override in reversed(overrides):
        set_key = override.partition("=")[0].strip()
        if re.search(rf"(?<![\w.]){re.escape(set_key)}(?!\w)", message):
            return f"override {override!r}"
    return str(path or "")


def _check_rules(cfg: Config) -> None:
    """Rules across fields that would otherwise fail only when the model or the data is built."""
    broken = next(_broken_rules(cfg), None)
    if broken:
        raise ConfigError(broken)


def _broken_rules(cfg: Config) -> Iterator[str]:
    """A message per broken rule, naming the keys involved."""
    m, schema = cfg.model, cfg.data.schema
    dim = model_embedding_dim(m)
    width_key = "model.embedding_dim" if m.embedding_dim else "model.tables.0.embedding_dim"
    if m.top_mlp[-1] != 1:
        yield f"model.top_mlp: {m.top_mlp} must end in 1 (the logit)"
    if m.arch == "dlrm" and m.bottom_mlp[-1] != dim:
        yield (f"model.bottom_mlp: {m.bottom_mlp} must end in {width_key}={dim} (dlrm's "
               "interaction takes the bottom MLP's output as one more embedding)")
    for i, table in enumerate(m.tables):
        if not m.embedding_dim and table.embedding_dim != dim:
            yield (f"model.tables.{i}.embedding_dim: {table.embedding_dim} differs from "
                   f"model.tables.0.embedding_dim={dim} (the model stacks every block's embeddings; "
                   "set model.embedding_dim for blocks of other storage widths)")
    workers = cfg.ray.num_workers if cfg.ray.enabled else 1
    for i, table in enumerate(m.tables):
        if workers > 1 and table.kind in SINGLE_WORKER_KINDS:
            yield (f"model.tables.{i}.kind: {table.kind!r} tables train on one worker only, not on "
                   f"ray.num_workers={workers} (their training forward draws random numbers that replicas on other "
                   "workers could not reproduce); set ray.num_workers=1 or ray.enabled=false")
    roles = [("label", schema.label), *(("dense", c) for c in schema.dense), *(("sparse", c) for c in schema.sparse),
             ("event_time", schema.event_time), ("true_prob", schema.true_prob)]
    first_role: dict[str, str] = {}
    for role, column in roles:
        if column and column in first_role:
            yield f"data.schema.{first_role[column]}: column {column!r} is also in data.schema.{role} (one role each)"
        first_role.setdefault(column, role)
    if cfg.train.register_as and not MODEL_NAME.fullmatch(cfg.train.register_as):
        yield (f"train.register_as: {cfg.train.register_as[:80]!r} cannot name a registered model (letters, digits, "
               "'_', '-', '.' or spaces, at most 256, starting with a letter or digit)")
    if cfg.train.register_as and not cfg.tracking.enabled:
        yield "train.register_as: registering needs MLflow (tracking.enabled=true)"
    o = cfg.online
    if o.register_as and not MODEL_NAME.fullmatch(o.register_as):
        yield f"online.register_as: {o.register_as[:80]!r} cannot name a registered model (as train.register_as)"
    if o.register_as and not cfg.tracking.enabled:
        yield "online.register_as: registering needs MLflow (tracking.enabled=true)"
    if o.snapshot_every and not o.register_as:
        yield "online.snapshot_every: snapshots are registered versions; set online.register_as"
    if len(o.calibration_range) != 2 or o.calibration_range[0] > o.calibration_range[1]:
        yield f"online.calibration_range: {o.calibration_range} must be [low, high] with low <= high"
    if len(cfg.data.raw.delimiter) != 1:
        yield f"data.raw.delimiter: {cfg.data.raw.delimiter!r} must be one character"


SINGLE_WORKER_KINDS = ("optembed",)
"""Table kinds that train on one worker only: refused for ray.num_workers > 1. Kinds that can be split
neither by row nor by ID (``qr``, ``multihash``, ``mixed_dim``) are replicated on every worker instead
(``recmem/tables/replicated.py``), which needs a training forward that the global step can recompute
exactly; ``optembed``'s draws random widths in it."""


def model_embedding_dim(m: ModelConfig) -> int:
    """The width of every pooled embedding the dense part sees: ``model.embedding_dim``, or the first
    block's ``embedding_dim`` when that is 0."""
    return m.embedding_dim or m.tables[0].embedding_dim


def _with_default_tables(data: dict[str, Any]) -> dict[str, Any]:
    """Materialise the default table list so ``model.tables.0.kind=hash`` overrides work."""
    model = data.setdefault("model", {}) if isinstance(data, dict) else {}
    if isinstance(model, dict) and "tables" not in model:
        model["tables"] = [{}]
    return data
