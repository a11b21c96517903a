"""Config validation at load time: ranges, empty lists, cross-field rules, YAML pitfalls, bad overrides.

Every error must name the dotted key (and the file or the override it came from), the bad value and
what is allowed, in one line.
"""

import dataclasses
import re
import typing

import pytest

from recmem.cli import main
from recmem.config import Config, ConfigError, Range, load_config


def _fails(overrides: list[str], *fragments: str) -> str:
    """Load the defaults with ``overrides``; assert a one-line ConfigError containing every fragment."""
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


@pytest.mark.parametrize(
    "override, key, allowed",
    [
        ("data.batch_size=0", "data.batch_size: 0 ", "> 0"),
        ("data.batch_size=-5", "data.batch_size: -5 ", "> 0"),
        ("train.learning_rate=0", "train.learning_rate: 0.0 ", "> 0"),
        ("train.learning_rate=-1e-3", "train.learning_rate: -0.001 ", "> 0"),
        ("model.tables.0.learning_rate=0", "model.tables.0.learning_rate: 0.0 ", "> 0"),
        ("model.tables.0.embedding_dim=0", "model.tables.0.embedding_dim: 0 ", "> 0"),
        ("model.tables.0.embedding_dim=-16", "model.tables.0.embedding_dim: -16 ", "> 0"),
        ("train.epochs=-1", "train.epochs: -1 ", "> 0"),
        ("train.epochs=0", "train.epochs: 0 ", "> 0"),
        ("train.checkpoint_every=-1", "train.checkpoint_every: -1 ", ">= 0"),
        ("train.max_steps=-3", "train.max_steps: -3 ", ">= 0"),
        ("data.raw.valid_fraction=1.5", "data.raw.valid_fraction: 1.5 ", "in [0, 1]"),
        ("data.synthetic.positive_rate=1", "data.synthetic.positive_rate: 1.0 ", "in (0, 1)"),
        ("data.synthetic.diurnal_amplitude=1", "data.synthetic.diurnal_amplitude: 1.0 ", "in [0, 1)"),
        ("ray.num_workers=0", "ray.num_workers: 0 ", "> 0"),
        ("ray.cpus_per_worker=0", "ray.cpus_per_worker: 0.0 ", "> 0"),
        ("ray.max_failures=-2", "ray.max_failures: -2 ", ">= -1"),
        ("model.top_mlp=[64,-1,1]", "model.top_mlp.1: -1 ", "> 0"),
        ("data.synthetic.dense_missing=[0.5,1.2]", "data.synthetic.dense_missing.1: 1.2 ", "in [0, 1]"),
    ],
)
def test_out_of_range_names_key_value_and_range(override, key, allowed):
    _fails([override], key, f"(allowed: {allowed})")


def _fields(cls: type, prefix: str = ""):
    """(dotted key, field type, item type, field) of every field under ``cls`` that is not a config
    section; a list's item type is its element's, a list of sections is walked at index 0."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, kind = prefix + f.name, hints[f.name]
        item = typing.get_args(kind)[0] if typing.get_origin(kind) is list else kind
        if dataclasses.is_dataclass(item):
            yield from _fields(item, key + (".0." if item is not kind else "."))
        else:
            yield key, kind, item, f


def _ranged_fields(cls: type):
    """(dotted key, field type, Range) of every field under ``cls`` that declares a range."""
    for key, kind, _, f in _fields(cls):
        if f.metadata.get("allowed") is not None:
            yield key, kind, f.metadata["allowed"]


def _numeric_fields(cls: type):
    """Dotted keys of every int or float field (or list of them) under ``cls``."""
    for key, _, item, _ in _fields(cls):
        if item in (int, float):
            yield key


RANGED = list(_ranged_fields(Config))

# Numeric fields for which every value works: each such field must be listed here, so a new numeric
# field cannot arrive without a decision about its range.
UNBOUNDED = {"data.synthetic.start_time"}  # any Unix time, before 1970 included


def test_every_numeric_field_has_a_range_or_is_listed_unbounded():
    ranged = {key for key, _, _ in RANGED}
    assert set(_numeric_fields(Config)) - ranged == UNBOUNDED


def _outside(kind: type, allowed: Range) -> list:
    """Values just outside ``allowed`` (one per finite bound) for a field of type ``kind``."""
    item = typing.get_args(kind)[0] if typing.get_origin(kind) is list else kind
    step = 1 if item is int else 0.5
    values = []
    if allowed.low is not None:
        values.append(item(allowed.low) if allowed.low_open else item(allowed.low - step))
    if allowed.high is not None:
        values.append(item(allowed.high) if allowed.high_open else item(allowed.high + step))
    return [[v] if item is not kind else v for v in values]


@pytest.mark.parametrize(
    "key, bad", [(key, bad) for key, kind, allowed in RANGED for bad in _outside(kind, allowed)],
    ids=lambda v: str(v),
)
def test_every_range_is_enforced_at_its_bounds(key, bad):
    value = str(bad).lower() if not isinstance(bad, list) else str(bad)
    _fails([f"{key}={value}"], key, "out of range (allowed: ")


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.top_mlp=[]", "model.top_mlp"),
        ("model.bottom_mlp=[]", "model.bottom_mlp"),
        ("model.tables=[]", "model.tables"),
        ("data.schema.label=''", "data.schema.label"),
        ("data.raw.delimiter=''", "data.raw.delimiter"),
        ("tracking.experiment=''", "tracking.experiment"),
        ("ray.run_name=''", "ray.run_name"),
    ],
)
def test_empty_where_something_is_needed(override, key):
    _fails([override], f"{key}: ", "is empty")


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_floats_are_refused(value):
    _fails([f"train.learning_rate={value}"], "train.learning_rate: expected a finite number")


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (["model.top_mlp=[64,8]"], ["model.top_mlp: [64, 8] must end in 1"]),
        (["model.bottom_mlp=[64,32]"], ["model.bottom_mlp: [64, 32] must end in model.tables.0.embedding_dim=16"]),
        (["model.tables.0.embedding_dim=8"], ["model.bottom_mlp", "model.tables.0.embedding_dim=8"]),
        (["model.tables=[{feature_names: [C1]}, {embedding_dim: 8}]"],
         ["model.tables.1.embedding_dim: 8 differs from model.tables.0.embedding_dim=16"]),
        (["data.schema.label=C3"], ["data.schema.label: column 'C3' is also in data.schema.sparse"]),
        (["data.schema.dense=[I1,I1]"], ["data.schema.dense: column 'I1' is also in data.schema.dense"]),
        (["data.raw.delimiter=';;'"], ["data.raw.delimiter: ';;' must be one character"]),
    ],
)
def test_contradicting_fields_name_the_keys(overrides, fragments):
    message = _fails(overrides, *fragments)
    assert message.startswith(f"override {overrides[0]!r}: ")


def test_dcnv2_bottom_mlp_need_not_match_the_embedding_width():
    cfg = load_config(None, ["model.arch=dcnv2", "model.bottom_mlp=[64,32]"])
    assert cfg.model.bottom_mlp == [64, 32]


@pytest.mark.parametrize("text", ["1e-3", "1.0e-3", "1E-3", "+1e-3", "0.1e-2", "1_0e-4"])
def test_exponent_notation_reads_as_float(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  learning_rate: {text}\nmodel:\n  tables:\n    - learning_rate: {text}\n"
                    f"      options:\n        min_count: {text}\n")
    cfg = load_config(path)
    assert cfg.train.learning_rate == pytest.approx(1e-3)
    assert cfg.model.tables[0].learning_rate == pytest.approx(1e-3)
    assert cfg.model.tables[0].options["min_count"] == pytest.approx(1e-3)
    assert load_config(None, [f"train.learning_rate={text}"]).train.learning_rate == pytest.approx(1e-3)


def test_int_for_float_field_and_float_for_int_field(tmp_path):
    assert load_config(None, ["train.learning_rate=2"]).train.learning_rate == 2.0
    _fails(["train.epochs=1e3"], "train.epochs: expected int, got 1000.0")


@pytest.mark.parametrize(
    "text, key, line, first",
    [
        ("train:\n  epochs: 2\n  learning_rate: 0.1\n  epochs: 3\n", "train.epochs", 4, 2),
        ("seed: 1\ntrain:\n  epochs: 2\nseed: 2\n", "seed", 4, 1),
        ("model:\n  tables:\n    - kind: hash\n      kind: full\n", "model.tables.0.kind", 4, 3),
    ],
)
def test_duplicate_yaml_keys_name_file_key_and_lines(tmp_path, text, key, line, first):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: {key}: duplicate key on line {line} (first on line {first})"


def test_override_below_a_value_is_refused():
    with pytest.raises(ConfigError, match=r"^train.epochs.x.y: train.epochs is not a section$"):
        load_config(None, ["train.epochs=2", "train.epochs.x.y=1"])


def test_errors_say_whether_the_file_or_an_override_is_at_fault(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: -1\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: train.epochs: -1 is out of range")):
        load_config(path)
    with pytest.raises(ConfigError, match=re.escape("override 'data.batch_size=0': data.batch_size: 0 is out")):
        load_config(path, ["train.epochs=2", "data.batch_size=0"])


def test_an_unparsable_file_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: [1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: not valid YAML: line ") and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.epochs=[1", "override 'train.epochs=[1': the value is not valid YAML: line 1, column 3"),
        ("=3", "override '=3': expected key=value with a dotted key"),
        ("train..epochs=3", "override 'train..epochs=3': expected key=value"),
        ("train.epochs", "override 'train.epochs': expected key=value"),
        ("train.epochs.x=1", "train.epochs: expected int, got {'x': 1}"),
        ("train.epoch=2", "train.epoch: unknown key"),
    ],
)
def test_bad_override_is_one_line_from_the_cli(capsys, override, fragment):
    assert main(["train", override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("recmem train: error: ") and fragment in err, err


def test_cli_help_still_works(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0 and "recmem train --config" in capsys.readouterr().out
