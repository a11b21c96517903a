"""The ``recmem`` command: generate, prepare, train, evaluate, quickstart, export, and the registry's
register, promote and models.

Every command takes ``--config FILE`` (optional: embedded defaults otherwise) and ``key=value``
overrides of any config field, e.g. ``recmem train --config jobs/configs/quickstart.yaml train.epochs=2``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from recmem.config import Config, ConfigError, load_config
from recmem.lock import LockedError, exclusive
from recmem.tracking.outbox import TrackingUnavailable
from recmem.train.distributed.group import WorkerFailed

COMMANDS = {
    "generate": "write recmem's synthetic Criteo-shaped click log (Parquet + feature statistics) to data.root, "
                "or with --landing land its training rows as a stream of files over time",
    "prepare": "convert a raw click log (data.raw.path: Criteo TSV or CSV) to Parquet + statistics in data.root",
    "train": "train the configured model on data.root (on Ray unless ray.enabled=false), validating, "
             "checkpointing and logging to MLflow",
    "evaluate": "score the latest checkpoint on the validation split (on Ray, with as many workers as "
                "wrote it, unless ray.enabled=false) and print its metrics and step",
    "quickstart": "generate the synthetic data if missing, train, and print the run and its AUC vs the oracle",
    "export": "write a versioned serving bundle of a trained model (--run RUN_ID, --checkpoint PATH, or the "
              "configured job's latest checkpoint) and print its folder and bytes",
    "register": "log a serving bundle (--bundle PATH, or exported from --run RUN_ID) as an MLflow pyfunc model "
                "and register it as a new version of --name",
    "promote": "point a registered model's alias (--alias, default champion) at VERSION; prints old -> new",
    "models": "list a registered model's versions, aliases and tags",
    "optembed": "OptEmbed's three phases on the configured model's optembed blocks: train the supernet, search "
                "per-field widths, retrain the compact tables (each a nested MLflow run; a rerun resumes)",
    "online": "train on the windows of a stream as they land in online.landing (score each, then train on it), "
              "committing the rows consumed with the model and pushing row deltas to online.endpoints",
    "frontier": "the memory/quality frontier: DLRM over each table kind at 1x, 4x, 16x and 64x less embedding "
                "memory than `full` (equal steps), reporting measured bytes, AUC, logloss, oracle gap and samples/s",
    "serve": "serve a model over HTTP (--bundle FOLDER, or --model NAME following --alias in the MLflow "
             "Model Registry): POST /predict, POST /delta, GET /health, GET /metrics",
}

EPILOG = """examples:
  recmem quickstart
  recmem generate --config jobs/configs/quickstart.yaml data.synthetic.train_rows=100000
  recmem generate --config jobs/configs/online.yaml --landing runs/online/landing --every 3
  recmem prepare --config jobs/configs/criteo_kaggle_10k.yaml
  recmem train --config jobs/configs/criteo_kaggle_10k.yaml train.epochs=3 model.tables.0.kind=hash \\
      model.tables.0.num_embeddings=100000
  recmem evaluate --config jobs/configs/criteo_kaggle_10k.yaml

Overrides are dotted paths into the config (see recmem/config.py); list items by index
(model.tables.0.kind=hash). MLflow: runs go to ./mlflow.db unless MLFLOW_TRACKING_URI is set;
browse them with `mlflow ui --backend-store-uri sqlite:///mlflow.db`.

Ray: `recmem train` runs on an embedded local Ray; ray.address=... (or RAY_ADDRESS) targets a
cluster, ray.num_workers=2 splits the job (each worker reads its own rows), ray.enabled=false runs
the plain single-process loop. On a cluster: ray job submit --working-dir . -- python jobs/train.py --config ...
`recmem evaluate` with the same config scores the latest checkpoint of the Ray run ray.run_name."""


def parser() -> argparse.ArgumentParser:
    """The argument parser (one sub-command per workflow step)."""
    p = argparse.ArgumentParser(
        prog="recmem", description="Train CTR models with memory-efficient embedding tables.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        c = sub.add_parser(name, help=help_text, description=help_text, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if name in ("register", "promote", "models"):  # before the overrides: NAME VERSION come first
            _registry_arguments(name, c)
        c.add_argument("--config", "-c", help="YAML config (default: embedded defaults)")
        c.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=2")
        if name == "generate":
            _generate_arguments(c)
        if name == "export":
            _export_arguments(c)
        if name == "serve":
            _serve_arguments(c)
        if name == "frontier":
            _frontier_arguments(c)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``recmem`` console script."""
    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra:  # overrides after an option that follows positionals (`promote NAME 2 --alias a key=value`)
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            p.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    try:
        cfg = load_config(args.config, args.overrides)
        if not cfg.tracking.verbose:
            from recmem.tracking.logger import quiet_libraries

            quiet_libraries()
        return {"generate": lambda c: _generate(c, args), "prepare": _prepare, "train": _train,
                "evaluate": _evaluate, "quickstart": _quickstart, "online": _online,
                "export": lambda c: _export(c, args), "register": lambda c: _register(c, args),
                "promote": lambda c: _promote(c, args), "models": lambda c: _models(c, args),
                "serve": lambda c: _serve(c, args), "optembed": _optembed,
                "frontier": lambda c: _frontier(c, args)}[args.command](cfg)
    except (ConfigError, OSError, LockedError, TrackingUnavailable, ValueError) as e:
        print(f"recmem {args.command}: error: {e}", file=sys.stderr)
        return 2
    except WorkerFailed as e:  # its line names the worker, its error and the restarts; the workers' own output shows the trace
        print(f"recmem {args.command}: error: {e}", file=sys.stderr)
        return 1


def _generate_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("--landing", help="land the training rows as files in this folder (or pyarrow URI) over time, "
                                     "for `recmem online`, instead of writing data.root")
    c.add_argument("--every", type=float, default=3.0, help="--landing: seconds between files (default 3; 0: at once)")
    c.add_argument("--file-rows", type=int, default=5000, help="--landing: rows per file (default 5000)")
    c.add_argument("--files", type=int, default=0, help="--landing: stop after this many (default 0: the whole "
                                                         "training split, data.synthetic.train_rows rows)")


def _generate(cfg: Config, args: argparse.Namespace) -> int:
    from recmem.data.synthetic import generate

    if args.landing:
        return _land(cfg, args)
    with exclusive(cfg.data.root, "generate"):
        summary = generate(cfg.data.synthetic, cfg.data.schema, Path(cfg.data.root), progress=True)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _land(cfg: Config, args: argparse.Namespace) -> int:
    """``recmem generate --landing``: the synthetic log's training rows, one file every ``--every`` s,
    until done or stopped (SIGINT / SIGTERM end it between two files, exit 0)."""
    import contextlib
    import signal
    import threading
    import time

    from recmem.data.synthetic import stream_tables
    from recmem.online.producer import land_stream

    if args.every < 0:
        raise ValueError(f"--every {args.every:g}: seconds between files must not be negative")
    tables = stream_tables(cfg.data.synthetic, cfg.data.schema, args.file_rows, args.files)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    started = time.perf_counter()
    try:
        with exclusive(args.landing, "generate --landing") if "://" not in args.landing else contextlib.nullcontext():
            files = land_stream(tables, args.landing, args.every, stop=stop, event_time=cfg.data.schema.event_time,
                                say=lambda line: print(f"recmem generate: {line}", flush=True))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    how = "stopped" if stop.is_set() else "done"
    print(f"recmem generate: {how}: {files} files in {args.landing} in {time.perf_counter() - started:.0f} s")
    return 0


def _prepare(cfg: Config) -> int:
    from recmem.data.convert import convert_raw
    from recmem.data.stats import write_stats

    with exclusive(cfg.data.root, "prepare"):  # one writer of data.root's splits and stats at a time
        report = convert_raw(cfg.data.raw, cfg.data.schema, Path(cfg.data.root), progress=True)
        print(report)
        write_stats(Path(cfg.data.root), cfg.data.schema)
    return 0


def _train(cfg: Config) -> int:
    import psutil

    from recmem.tracking.logger import check_tracking

    started_at = psutil.Process().create_time()  # start-up is timed from this process's start
    check_tracking(cfg)  # a tracking server that does not answer fails now, not after the imports
    if cfg.ray.enabled:
        from recmem.train.distributed import train_ray

        result = train_ray(cfg, started_at)
    else:
        from recmem.train.local import train_local

        result = train_local(cfg, started_at)
    resumed = result.metrics.get("resume/step") if cfg.ray.enabled else result.resumed_from
    _print_result(result.metrics, result.samples_per_second, result.run, resumed is not None)
    if cfg.train.register_as:
        return _register_trained(cfg, getattr(result, "checkpoint", None))  # Ray's result names its checkpoint
    return 0


def _optembed(cfg: Config) -> int:
    from recmem.tracking.logger import check_tracking
    from recmem.train.optembed import run_optembed

    check_tracking(cfg)
    result = run_optembed(cfg)
    print(f"supernet      valid AUC {result.supernet.metrics.get('valid/auc', float('nan')):.4f}")
    print(f"search        widths {result.widths}, supernet AUC at them {result.search_auc:.4f}")
    for path in result.plans:
        print(f"plan          {path}")
    _print_result(result.retrain.metrics, result.retrain.samples_per_second, result.run, False)
    print(f"tables        {result.retrain.metrics.get('tables/memory_bytes', float('nan')):,.0f} bytes retrained; "
          f"evaluate or export it with train.checkpoint_dir={result.retrain_checkpoints} and each "
          "block's options.plan set to its plan above")
    return 0


def _online(cfg: Config) -> int:
    from recmem.online.loop import run_online
    from recmem.tracking.logger import check_tracking, runs_marked_failed

    check_tracking(cfg)
    with runs_marked_failed():
        result = run_online(cfg)
    print(f"recmem online: {result.windows} windows, {result.rows:,} rows committed"
          + (f"; quarantined {len(result.quarantined)} files" if result.quarantined else ""))
    return 0


def _evaluate(cfg: Config) -> int:
    if cfg.ray.enabled:
        from recmem.train.distributed import evaluate_ray

        metrics = evaluate_ray(cfg)
    else:
        from recmem.train.local import evaluate_local

        metrics = evaluate_local(cfg)
    print(json.dumps(metrics, indent=2))
    return 0


def _quickstart(cfg: Config) -> int:
    from recmem.data.dataset import count_rows
    from recmem.data.synthetic import generate

    root = Path(cfg.data.root)
    try:
        count_rows(root, "train")
    except FileNotFoundError:
        print(f"recmem quickstart: generating synthetic data in {root}", flush=True)
        s = generate(cfg.data.synthetic, cfg.data.schema, root, progress=cfg.train.progress and sys.stderr.isatty())
        print(f"generated {s['train/rows']:,} training and {s['valid/rows']:,} validation rows in "
              f"{s['seconds']:.0f} s; the generator's own probabilities score valid AUC {s['valid/oracle_auc']:.4f}")
    return _train(cfg)


def _export_arguments(c: argparse.ArgumentParser) -> None:
    source = c.add_mutually_exclusive_group()
    source.add_argument("--run", help="MLflow run id of a training (its config and checkpoint are found from it)")
    source.add_argument("--checkpoint", help="a checkpoint file or folder (single-process or Ray) of the configured model")
    c.add_argument("--format", default="fp32", choices=["fp32", "fp16", "int8"], help="table row format (default fp32)")
    c.add_argument("--out", help="parent folder of the versioned bundles (default: <workdir>/exports)")


def _export(cfg: Config, args: argparse.Namespace) -> int:
    from recmem.export.job import export_job, export_run
    from recmem.export.writer import bundle_bytes
    from recmem.tracking.logger import default_tracking_uri

    if args.run:
        tracking = cfg.tracking.tracking_uri or default_tracking_uri(cfg.workdir)
        folder = export_run(args.run, tracking, args.out, args.format, args.overrides)
    else:
        folder = export_job(cfg, args.out, args.format, args.checkpoint)
    print(f"{folder}  {bundle_bytes(folder):,} bytes")
    return 0


def _registry_arguments(name: str, c: argparse.ArgumentParser) -> None:
    if name == "register":
        c.add_argument("--name", required=True, help="the registered model (created on first use)")
        source = c.add_mutually_exclusive_group(required=True)
        source.add_argument("--run", help="MLflow run id of a training: its newest checkpoint is exported (fp32)")
        source.add_argument("--bundle", help="a bundle folder written by `recmem export`")
        return
    c.add_argument("model_name", metavar="NAME", help="the registered model")
    if name == "promote":
        c.add_argument("version", metavar="VERSION", help="the model version the alias moves to")
        c.add_argument("--alias", default="champion", help="the alias (default champion)")


def _tracking_uri(cfg: Config) -> str:
    from recmem.tracking.logger import default_tracking_uri

    return cfg.tracking.tracking_uri or default_tracking_uri(cfg.workdir)


def _register(cfg: Config, args: argparse.Namespace) -> int:
    from recmem.registry import register_run

    version, folder = register_run(args.name, _tracking_uri(cfg), args.run, args.bundle,
                                   overrides=args.overrides, cfg=cfg)
    print(f"registered {args.name} version {version} ({folder})")
    return 0


def _register_trained(cfg: Config, checkpoint: str | None) -> int:
    """``train.register_as``: a failure here leaves the trained checkpoint as it is, in one line."""
    from recmem.registry import register_trained

    name = cfg.train.register_as
    try:
        version, folder = register_trained(cfg, name, checkpoint)
    except Exception as e:  # whatever fails, the run and its checkpoint stand; say what and how to retry
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        print(f"recmem train: registering as {name!r} failed ({reason}); the checkpoint is kept: "
              f"retry with `recmem register --run RUN_ID --name {name}`", file=sys.stderr)
        return 1
    print(f"registered {name} version {version} ({folder})")
    return 0


def _promote(cfg: Config, args: argparse.Namespace) -> int:
    from recmem.registry import set_alias

    old = set_alias(args.model_name, args.alias, args.version, _tracking_uri(cfg))
    print(f"{args.model_name}@{args.alias}: {old or 'none'} -> {args.version.strip()}")
    return 0


def _models(cfg: Config, args: argparse.Namespace) -> int:
    from recmem.registry import describe

    for v in describe(args.model_name, _tracking_uri(cfg)):
        tags = v["tags"]
        print(f"version {v['version']:>4}  {','.join(v['aliases']) or '-':<12} {tags.get('recmem.bundle_version', '-')}  "
              f"valid AUC {tags.get('recmem.valid_auc', '-')}  run {v['run_id'] or '-'}")
    return 0


def _frontier_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("--quick", action="store_true", help="tiny data, 1x and 16x, a few steps (the test suite's)")
    c.add_argument("--out", help="folder of the points and the report (default: <workdir>/runs/frontier/<data root>)")
    c.add_argument("--steps", type=int, default=0, help="steps per point (default: train.max_steps, else the epochs)")
    c.add_argument("--ratios", default="1,4,16,64", help="memory ratios to full (default 1,4,16,64)")
    c.add_argument("--kinds", help="comma-separated kinds (default: every kind issue 11 names)")
    c.add_argument("--lr", action="append", default=[], metavar="KIND=RATE", help="a kind's table learning rate")
    c.add_argument("--seeds", default="1", help="N: train every point with seeds 0..N-1; or a list, 3,7,11 "
                                                "(default 1: seed 0); the report gives mean and spread")
    c.add_argument("--multihash", default="4:concat", metavar="K:COMBINE",
                   help="multihash's sizing: K hashes per ID, their rows summed (sum, rows of width D) or laid side by "
                        "side (concat, rows of width D / K: up to K times the rows at the same bytes) (default 4:concat)")


def _frontier(cfg: Config, args: argparse.Namespace) -> int:
    from recmem.bench.frontier import FrontierOptions, ensure_data, quick, run_frontier

    try:
        ratios = tuple(float(r) for r in args.ratios.split(","))
        rates = {k: float(v) for k, _, v in (x.partition("=") for x in args.lr)}
        seeds = [int(x) for x in args.seeds.split(",")]
        hashes, _, combine = args.multihash.partition(":")
        multihash = (int(hashes), combine)
    except ValueError:
        raise ValueError(f"--ratios {args.ratios!r}, --lr {args.lr}, --seeds {args.seeds!r} and --multihash "
                         f"{args.multihash!r} must be numbers (KIND=RATE; seeds: a count or a comma-separated list; "
                         "K:COMBINE)") from None
    if multihash[0] < 1 or combine not in ("sum", "concat"):
        raise ValueError(f"--multihash {args.multihash!r}: K (at least 1 hash) and sum or concat, as 4:concat")
    seeds = tuple(range(seeds[0])) if len(seeds) == 1 else tuple(seeds)
    if min(ratios) < 1 or args.steps < 0:
        raise ValueError("--ratios must be at least 1 and --steps not negative")
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {args.seeds!r}: a count of at least 1, or distinct non-negative seeds")
    out = Path(args.out or Path(cfg.workdir) / "runs" / "frontier" / Path(cfg.data.root).name)
    kinds = tuple(args.kinds.split(",")) if args.kinds else FrontierOptions(out).kinds
    opts = FrontierOptions(out, ratios, args.steps, kinds, rates, seeds, multihash)
    if args.quick:
        cfg, opts = quick(cfg, opts)
    skipped = ensure_data(cfg)
    if skipped:
        print(f"recmem frontier: {skipped}")
        return 0
    run_frontier(cfg, opts)
    print(f"recmem frontier: report in {out}")
    return 0


def _serve_arguments(c: argparse.ArgumentParser) -> None:
    from recmem.serve.limits import Limits

    source = c.add_mutually_exclusive_group(required=True)
    source.add_argument("--bundle", help="a bundle folder written by recmem export")
    source.add_argument("--model", help="a registered model name (MLflow Model Registry)")
    c.add_argument("--alias", default="champion", help="the alias to serve and follow (default champion)")
    c.add_argument("--name", help="the model name in answers and metrics (default: --model, else recmem)")
    c.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    c.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    c.add_argument("--poll-s", type=float, default=30.0, help="seconds between alias polls (default 30)")
    c.add_argument("--torch-threads", type=int, default=1,
                   help="torch threads per request (default 1: requests are small and run side by side)")
    for field, text in (("max_body_bytes", "largest /predict body"), ("max_rows", "most rows per /predict"),
                        ("max_bag", "most IDs in one multi-hot bag"), ("max_delta_bytes", "largest /delta body")):
        default = getattr(Limits(), field)
        c.add_argument(f"--{field.replace('_', '-')}", type=int, default=default, help=f"{text} (default {default})")


def _serve(cfg: Config, args: argparse.Namespace) -> int:
    from recmem.serve.run import ServeOptions, serve
    from recmem.serve.limits import Limits
    from recmem.tracking.logger import default_tracking_uri

    limits = Limits(args.max_body_bytes, args.max_rows, args.max_bag, args.max_delta_bytes)
    if min(limits.max_body_bytes, limits.max_rows, limits.max_bag, limits.max_delta_bytes) < 1 or args.poll_s <= 0:
        raise ValueError("--max-* limits and --poll-s must be positive")
    if args.torch_threads < 1:
        raise ValueError("--torch-threads must be at least 1")
    tracking = cfg.tracking.tracking_uri or default_tracking_uri(cfg.workdir)
    return serve(ServeOptions(args.bundle, args.model, args.alias, args.name, args.host, args.port, args.poll_s,
                              Path(cfg.workdir) / "serving" / (args.model or "bundle"), tracking, limits,
                              args.torch_threads))


def _print_result(metrics: dict[str, float], samples_per_second: float, run: str, resumed: bool) -> None:
    print(f"\nMLflow: {run}")
    print(f"valid AUC     {metrics.get('valid/auc', float('nan')):.4f}   logloss {metrics.get('valid/logloss', float('nan')):.4f}")
    if "valid/oracle_auc" in metrics:
        print(f"oracle AUC    {metrics['valid/oracle_auc']:.4f}   gap {metrics['valid/auc_gap']:.4f}")
    if samples_per_second > 0:
        print(f"train speed   {samples_per_second:,.0f} samples/s")
    elif resumed:  # the line above the bar said which checkpoint and step
        print("nothing left to train: the checkpoint it resumed from had finished (train.resume=false starts afresh)")


if __name__ == "__main__":
    sys.exit(main())
