"""The online loop (recmem/online): landing-directory windows, quarantine, test-then-train, and
exactly-once progress through crashes (SIGKILL at several points, then file accounting)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recmem.online.loop import run_online
from recmem.online.source import QUARANTINE
from recmem.train.checkpoint import list_checkpoints, load_latest
from tests.conftest import small_schema, tiny_config, tiny_overrides, write_learnable_root

FILE_ROWS = 600  # 3 batches of 256, the last short: no row may be dropped
COLLISIONLESS = ["model.tables.0.kind=collisionless", "model.tables.0.options.capacity=1000",
                 "model.tables.0.options.ttl=100000", "tracking.enabled=false"]


@pytest.fixture(scope="module")
def stream(tmp_path_factory) -> tuple[Path, pa.Table]:
    """A data root (for the model's statistics) and time-ordered rows to land as files."""
    root = write_learnable_root(tmp_path_factory.mktemp("online"), small_schema(), rows=6 * FILE_ROWS, valid=300)
    return root, pq.read_table(root / "train" / "part-00000.parquet")


def land(landing: Path, table: pa.Table, files: int, first: int = 0) -> list[str]:
    """Land ``files`` files of FILE_ROWS rows as a producer does (write, then rename)."""
    landing.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(first, first + files):
        name = f"part-{i:04d}.parquet"
        pq.write_table(table.slice(i * FILE_ROWS, FILE_ROWS), landing / f".{name}.tmp")
        (landing / f".{name}.tmp").rename(landing / name)
        names.append(name)
    return names


def online_config(root: Path, work: Path, landing: Path, *overrides: str):
    return tiny_config(root, work, f"online.landing={landing}", "online.idle_exit_s=0.2",
                       "online.poll_interval_s=0.05", *COLLISIONLESS, *overrides)


def final_state(work: Path) -> dict:
    state, _ = load_latest(work / "runs" / "online")
    return state


def test_windows_train_once_each_and_resume_mid_file(stream, tmp_path):
    root, table = stream
    landing = tmp_path / "landing"
    names = land(landing, table, 3)
    whole = run_online(online_config(root, tmp_path / "whole", landing, "online.window_rows=250"), say=lambda _: None)
    assert whole.windows == 9 and whole.rows == 3 * FILE_ROWS  # 250 + 250 + 100 per file
    assert whole.offsets == {n: FILE_ROWS for n in names}
    assert all(h["rows_live"] > 0 for h in whole.history)  # collisionless rows, counted per window
    assert [(h["key"], h["rows"]) for h in whole.history[:3]] == [(names[0], 250), (names[0], 250), (names[0], 100)]
    # Stopped after 4 windows (mid-file), then resumed: the same model as the run that never stopped.
    part = online_config(root, tmp_path / "split", landing, "online.window_rows=250")
    first = run_online(online_config(root, tmp_path / "split", landing, "online.window_rows=250",
                                     "online.max_windows=4"), say=lambda _: None)
    assert first.offsets == {names[0]: FILE_ROWS, names[1]: 250}
    lines: list[str] = []
    rest = run_online(part, say=lines.append)
    assert "4 windows, 850 rows committed" in lines[0]
    assert rest.windows == 9 and rest.offsets == whole.offsets
    a, b = final_state(tmp_path / "whole"), final_state(tmp_path / "split")
    assert a["step"] == b["step"] == 9  # one batch of at most 256 rows per window
    for key in a["model"]:
        if isinstance(a["model"][key], torch.Tensor):
            assert torch.equal(a["model"][key], b["model"][key]), key


def test_scores_each_window_before_training_on_it(stream, tmp_path):
    from recmem.online.source import LandingDirectory
    from recmem.train.loop import build_job_model, evaluate

    root, table = stream
    landing = tmp_path / "landing"
    land(landing, table, 2)
    cfg = online_config(root, tmp_path / "w", landing)
    result = run_online(cfg, say=lambda _: None)
    fresh = build_job_model(cfg)  # the same seed: the model before any training
    window = LandingDirectory(str(landing), cfg.data.schema).next_window({})
    before = evaluate(fresh, window.batches(cfg.data.schema, cfg.data.batch_size), "online")
    assert result.history[0]["auc"] == pytest.approx(before["online/auc"], abs=1e-6)
    assert result.history[1]["auc"] > result.history[0]["auc"]  # it learns as it goes


def test_bad_files_are_quarantined_never_trained(stream, tmp_path):
    root, table = stream
    landing = tmp_path / "landing"
    good = land(landing, table, 2)
    (landing / "a-truncated.parquet").write_bytes((landing / good[0]).read_bytes()[:500])
    pq.write_table(table.slice(0, 50).drop(["C2"]), landing / "b-no-column.parquet")
    labels = table.slice(0, 50).column("label").to_numpy().copy()
    labels[7] = 5.0
    bad = table.slice(0, 50).set_column(table.schema.get_field_index("label"), "label", pa.array(labels))
    pq.write_table(bad, landing / "c-label.parquet")
    pq.write_table(table.slice(0, 50), landing / ".d-in-flight.parquet")  # not renamed yet: ignored
    lines: list[str] = []
    result = run_online(online_config(root, tmp_path / "w", landing), say=lines.append)
    assert result.offsets == {n: FILE_ROWS for n in good}
    assert sorted(result.quarantined) == ["a-truncated.parquet", "b-no-column.parquet", "c-label.parquet"]
    reasons = {p.name: p.read_text() for p in (landing / QUARANTINE).glob("*.reason.txt")}
    assert "footer" in reasons["a-truncated.parquet.reason.txt"]
    assert "'C2'" in reasons["b-no-column.parquet.reason.txt"]
    assert "row 7" in reasons["c-label.parquet.reason.txt"] and "label" in reasons["c-label.parquet.reason.txt"]
    assert sum("quarantined" in line for line in lines) == 3
    assert (landing / ".d-in-flight.parquet").exists()


def initial_bundle(cfg, out: Path) -> Path:
    """The serving bundle of the loop's starting model (the same seed builds the same weights)."""
    from recmem.export.job import bundle_info, export_model
    from recmem.train.loop import build_job_model

    model = build_job_model(cfg)
    return export_model(model, cfg, out, "fp32", bundle_info(cfg, {"model": model.state_dict(), "step": 0}, "initial"))


def assert_serves(service, cfg, state: dict) -> None:
    """The server answers the first validation rows as the model of checkpoint ``state`` does (1e-5)."""
    from recmem.export.check import probe_batch
    from recmem.train.loop import build_job_model

    model = build_job_model(cfg)
    model.load_state_dict(state["model"])
    model.eval()
    probe = probe_batch(cfg)
    with torch.no_grad():
        expected = model(probe)
    kjt, sparse = probe.sparse_features, list(cfg.data.schema.sparse)
    got = service.served.bundle.logits(probe.dense_features, [kjt[f].values() for f in sparse],
                                       [kjt[f].lengths().to(torch.int64) for f in sparse])
    assert torch.allclose(got, expected, atol=1e-5), float((got - expected).abs().max())


@pytest.mark.parametrize("kind", ["collisionless", "hash"])
def test_deltas_keep_a_server_equal_to_the_trained_model(stream, tmp_path, kind):
    """Deltas after each commit (a server swapped to another version meanwhile gets a full resend),
    and the server answers as the final checkpoint does; evicted IDs are deleted there too."""
    from recmem.serve.service import ModelService, Served
    from recmem.serving import load_bundle

    root, table = stream
    landing = tmp_path / "landing"
    land(landing, table, 4)
    tables = (["model.tables.0.options.track_changes=true", "model.tables.0.options.ttl=20000"] if kind == "collisionless"
              else ["model.tables.0.kind=hash", "model.tables.0.num_embeddings=512", "model.tables.0.options={}"])
    cfg = online_config(root, tmp_path / "w", landing, "online.endpoints=[http://fake]", "online.sync_interval_s=0",
                        "online.dense_every=1", *tables)
    start = load_bundle(initial_bundle(cfg, tmp_path / "bundles"))
    service = ModelService("m", Served(start))

    deltas = []

    def post(url: str, body: bytes) -> tuple[int, dict]:
        if url.endswith("/health"):
            return service.health()
        deltas.append(url)
        if len(deltas) == 3:  # the server restarts from its first bundle: this delta no longer applies
            service.swap(Served(start))
        return service.delta(body)

    records = run_online(cfg, say=lambda _: None, post=post).history
    assert [r["delta_full"] for r in records] == [1, 0, 1, 0]  # the first push, and the one the swap refused
    assert all(r["delta_failures"] == 0 for r in records)
    assert all(0 < r["freshness_s"] < 600 for r in records)  # landing (file mtime) to served
    assert all(r["delta_rows"] > 0 for r in records)
    assert service.served.bundle.version == records[-1]["delta_version"]
    assert_serves(service, cfg, final_state(tmp_path / "w"))


@pytest.mark.slow
def test_delta_of_k_touched_rows_of_a_10m_row_table_holds_k_rows(tmp_path):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from recmem.config import load_config
    from recmem.online.sync import DeltaPublisher
    from recmem.train.loop import build_job_model

    rows = 10_000_000
    cfg = load_config(None, [
        f"workdir={tmp_path}", "data.schema.dense=[I1]", "data.schema.sparse=[C1]", "model.bottom_mlp=[8,4]",
        "model.top_mlp=[8,1]", "model.tables.0.kind=collisionless", "model.tables.0.embedding_dim=4",
        f"model.tables.0.options={{capacity: {rows}, initial_rows: {rows}, track_changes: true}}",
        "online.endpoints=[http://unused]", "train.precision=fp32"])
    model = build_job_model(cfg)
    publisher = DeltaPublisher(cfg, model)
    table = model.tables.tables[0]
    ids = torch.arange(rows, dtype=torch.int64) * 7919 + 13

    def touch(values: torch.Tensor) -> torch.Tensor:  # a training lookup: rows admitted and marked touched
        return table(KeyedJaggedTensor(keys=["C1"], values=values, lengths=torch.ones(len(values), dtype=torch.int64)))

    with torch.no_grad():
        for start in range(0, rows, 2_000_000):
            touch(ids[start:start + 2_000_000])
    assert table.stats()["rows_live"] == rows
    table.take_changes()  # as if pushed
    for k in (10, 1000):
        touch(ids[torch.randperm(rows)[:k]]).sum().backward()
        publisher.collect()
        delta = publisher.delta("base", "next", dense=False)
        assert len(delta["tables"]["C1"]["ids"]) == k and delta["tables"]["C1"]["deleted"] == []
        publisher.discard()


@pytest.mark.slow
def test_sigkill_and_sigterm_at_every_stage_train_every_row_once_and_keep_the_server_whole(stream, tmp_path):
    """``recmem online`` pushing to a real server over HTTP is killed -9 mid-commit (a checkpoint
    being written), mid-delta (while the server handles its push, which it then applies: the loop
    died, the server moved on) and mid-window (right after a commit), with files landing while it
    is down, then stopped by SIGTERM (exit 0 with whole windows only) and run to the end. By file
    accounting and by weights the result equals a run never interrupted, and the server answers as
    the final checkpoint."""
    from recmem.serve.http import ModelHTTPServer
    from recmem.serve.service import ModelService, Served
    from recmem.serving import load_bundle

    root, table = stream
    landing = tmp_path / "landing"
    names = land(landing, table, 4)
    work = tmp_path / "killed"
    sync = ["model.tables.0.options.track_changes=true", "online.sync_interval_s=0", "online.dense_every=1"]
    cfg = online_config(root, work, landing, *sync)
    procs: list[subprocess.Popen] = []
    deltas: list[int] = []
    kill_on_delta = [0]

    class KillingService(ModelService):
        def delta(self, body: bytes):
            deltas.append(len(procs))
            if kill_on_delta[0] == len(procs):  # the loop dies while its delta is in the server's hands
                procs[-1].kill()
            return super().delta(body)

    service = KillingService("m", Served(load_bundle(initial_bundle(cfg, tmp_path / "bundles"))))
    server = ModelHTTPServer(("127.0.0.1", 0), service)
    server.start()
    command = [sys.executable, "-m", "recmem.cli", "online",
               *tiny_overrides(root, work, f"online.landing={landing}", "online.idle_exit_s=1",
                               "online.poll_interval_s=0.05", *COLLISIONLESS, *sync,
                               f"online.endpoints=[http://127.0.0.1:{server.port}]")]
    folder = work / "runs" / "online"

    def steps() -> int:
        done = list_checkpoints(folder)
        return int(done[-1].stem.split("-")[1]) if done else 0

    def launch_until(seen, sig: int = signal.SIGKILL) -> subprocess.Popen:
        procs.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        deadline = time.monotonic() + 120
        while not seen() and procs[-1].poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert procs[-1].poll() is None or procs[-1].returncode == -signal.SIGKILL, "it ended before the kill point"
        procs[-1].send_signal(sig)
        procs[-1].communicate(timeout=120)
        return procs[-1]

    try:
        launch_until(lambda: folder.is_dir() and any(p.name.startswith(".step-") for p in folder.iterdir()))
        kill_on_delta[0] = 2  # the second launch dies inside its first push
        assert launch_until(lambda: len(procs) in deltas).returncode == -signal.SIGKILL
        names += land(landing, table, 2, first=4)  # more files land while the loop is down
        base = steps()
        launch_until(lambda: steps() >= base + 3)  # one more window committed, killed inside the next
        pushed = len(deltas)
        stopped = launch_until(lambda: len(deltas) > pushed, signal.SIGTERM)  # after its first push
        assert stopped.returncode == 0
        assert final_state(work)["online"]["windows"] < 6  # it stopped on SIGTERM, not for lack of files
        done = subprocess.run(command, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-2000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        server.shutdown()
        server.server_close()
    state = final_state(work)
    assert state["online"]["offsets"] == {n: FILE_ROWS for n in names}  # every file, every row
    assert state["online"]["rows"] == 6 * FILE_ROWS and state["online"]["windows"] == 6
    assert state["step"] == 6 * 3  # one step per batch: a window trained twice would add steps

    reference = run_online(online_config(root, tmp_path / "never_killed", landing), say=lambda _: None)
    assert reference.offsets == state["online"]["offsets"]
    expected = final_state(tmp_path / "never_killed")
    for key, value in expected["model"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, state["model"][key]), key
    assert_serves(service, cfg, state)


@pytest.mark.slow
def test_snapshots_move_champion_only_past_the_guardrail_and_roll_serving_back(stream, tmp_path):
    """Windows 1-2 make version 1 the champion; windows 3-4 hold no click, so version 2's calibration
    fails the guardrail: champion stays at 1, the reason is tagged, the server gets version 1 back in
    full, and window 5 pushes no delta over it."""
    from recmem.online.snapshot import GUARDRAIL_TAG
    from recmem.registry import alias_version, registry_client
    from recmem.serve.service import ModelService, Served
    from recmem.serving import load_bundle

    root, table = stream
    landing = tmp_path / "landing"
    land(landing, table, 2)
    no_clicks = table.set_column(table.schema.get_field_index("label"), "label",
                                 pa.array(torch.zeros(table.num_rows).numpy()))
    land(landing, no_clicks, 2, first=2)
    land(landing, table, 1, first=4)
    work = tmp_path / "w"
    cfg = online_config(root, work, landing, "model.tables.0.options.track_changes=true", "tracking.enabled=true",
                        "online.register_as=ctr", "online.snapshot_every=2", "online.guardrail_windows=2",
                        "online.endpoints=[http://fake]", "online.sync_interval_s=0", "online.dense_every=1")
    service = ModelService("m", Served(load_bundle(initial_bundle(cfg, tmp_path / "bundles"))))
    posts: list[str] = []

    def post(url: str, body: bytes) -> tuple[int, dict]:
        posts.append(url)
        return service.health() if url.endswith("/health") else service.delta(body)

    lines: list[str] = []
    result = run_online(cfg, say=lines.append, post=post)
    uri = f"sqlite:///{work}/mlflow.db"
    assert [h.get("guardrail_passed") for h in result.history] == [None, 1.0, None, 0.0, None]
    assert alias_version("ctr", "champion", uri) == "1"
    reason = registry_client(uri).get_model_version("ctr", "2").tags[GUARDRAIL_TAG]
    assert "calibration" in reason
    champion = load_bundle(next((work / "serving").glob("ctr-v1/artifacts/bundle")))
    assert service.served.bundle.version == champion.version  # rolled back, nothing pushed after
    assert "delta_version" in result.history[3] and "delta_version" not in result.history[4]
    assert any("stays a candidate" in line for line in lines)


@pytest.mark.parametrize("overrides, message", [
    (["online.snapshot_every=3"], "online.snapshot_every: snapshots are registered versions"),
    (["online.register_as=a/b"], "online.register_as: 'a/b' cannot name a registered model"),
    (["online.register_as=ctr", "tracking.enabled=false"], "registering needs MLflow"),
    (["online.calibration_range=[1.2,0.9]"], "online.calibration_range: [1.2, 0.9] must be [low, high]"),
    (["online.window_rows=-1"], "online.window_rows: -1 is out of range"),
    (["online.poll_interval_s=0"], "online.poll_interval_s: 0.0 is out of range"),
])
def test_online_config_errors_name_the_key(overrides, message):
    from recmem.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_deltas_refuse_tables_they_cannot_carry(stream, tmp_path):
    from recmem.config import ConfigError
    from recmem.online.sync import DeltaPublisher
    from recmem.train.loop import build_job_model

    root, _ = stream
    cfg = online_config(root, tmp_path, tmp_path / "landing", "online.endpoints=[http://x]")
    with pytest.raises(ConfigError, match=r"model\.tables\.0\.options\.track_changes: must be true"):
        DeltaPublisher(cfg, build_job_model(cfg))


def test_ray_workers_take_no_source_from_the_caller(stream, tmp_path):
    from recmem.config import ConfigError
    from recmem.online.source import LandingDirectory

    root, _ = stream
    cfg = online_config(root, tmp_path, tmp_path / "landing", "ray.enabled=true", "ray.num_workers=2")
    with pytest.raises(ConfigError, match="ray.num_workers=2: the workers read online.landing"):
        run_online(cfg, source=LandingDirectory(str(tmp_path / "landing"), cfg.data.schema))


def test_landing_directory_by_filesystem_uri(stream, tmp_path):
    from recmem.online.source import LandingDirectory

    _, table = stream
    names = land(tmp_path / "landing", table, 2)
    (tmp_path / "landing" / "broken.parquet").write_bytes(b"PAR1")
    source = LandingDirectory((tmp_path / "landing").as_uri(), small_schema(), window_rows=400, report=lambda _: None)
    first = source.next_window({})
    assert (first.key, first.begin, first.table.num_rows, first.last) == (names[0], 0, 400, False)
    second = source.next_window({names[0]: 400})
    assert (second.key, second.begin, second.table.num_rows, second.last) == (names[0], 400, 200, True)
    assert source.next_window({names[0]: FILE_ROWS, names[1]: FILE_ROWS}) is None
    assert source.quarantined == ["broken.parquet"] and (tmp_path / "landing" / QUARANTINE / "broken.parquet").exists()
