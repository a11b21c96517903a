"""jobs/bench_guards.py runs end to end on a small state and prints its three figures."""

import re

from jobs.bench_guards import main


def test_bench_guards_prints_each_cost_against_its_baseline(capsys):
    main(["--rows", "2000"])
    out = capsys.readouterr().out
    assert re.search(r"non-finite agreement, 2 ranks \(gloo\): \d+ us per step", out), out
    assert re.search(r"save [\d.]+ s plain, [\d.]+ s verified \([\d.]+x", out), out
    assert re.search(r"load [\d.]+ s plain, [\d.]+ s verified \([\d.]+x\)", out), out
