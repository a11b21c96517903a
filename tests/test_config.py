"""Config loading: defaults, YAML, overrides, and errors that name the key or file."""

from pathlib import Path

import pytest

from recmem.config import Config, ConfigError, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "jobs" / "configs").glob("*.yaml"))


def test_defaults_are_a_working_config():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.model.tables[0].kind == "full"
    assert len(cfg.data.schema.sparse) == 26 and len(cfg.data.schema.dense) == 13


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 3\nmodel:\n  tables:\n    - kind: hash\n      num_embeddings: 10\n")
    cfg = load_config(path, ["train.learning_rate=0.5", "model.tables.0.embedding_dim=8", "model.bottom_mlp=[64,8]",
                             "train.precision=bf16"])
    assert cfg.train.epochs == 3 and cfg.train.learning_rate == 0.5
    assert cfg.model.tables[0].kind == "hash" and cfg.model.tables[0].embedding_dim == 8
    assert cfg.train.precision == "bf16"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr=0.1", "train.lr: unknown key"),
        ("train.epochs=two", "train.epochs: expected int"),
        ("train.precision=fp8", "train.precision: 'fp8' is not one of"),
        ("model.tables.3.kind=hash", "model.tables.3: no list item"),
        ("data.schema.sparse=C1", "data.schema.sparse: expected a list"),
        ("model.tables.0.embedding_dim=true", "model.tables.0.embedding_dim: expected int"),
        ("train", "expected key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, [override])


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    nested = tmp_path / "nested.yaml"
    nested.write_text("data:\n  schema:\n    labels: y\n")
    with pytest.raises(ConfigError, match=r"nested.yaml: data.schema.labels: unknown key"):
        load_config(nested)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_say_how_to_run(path):
    assert path.read_text().startswith("# "), f"{path.name} must open with the command that runs it"
    load_config(path)
