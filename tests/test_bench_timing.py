"""bench/raster.py's grid timing: renderers interleaved with alternating order, small calls repeated."""
import time

import torch

from conftest import load_bench


def test_calls_interleave_alternate_and_repeat_small_rows(monkeypatch):
    bench = load_bench("raster")
    monkeypatch.setattr(bench, "ROW_SECONDS", 0.05)
    order = []

    def fn(name, seconds):
        def call():
            order.append(name)
            time.sleep(seconds)
        return call

    fast = bench.time_calls({"a": fn("a", 0.001), "b": fn("b", 0.0005)}, 3, torch.device("cpu"))
    timed = order[4:]  # after each one's warm-up and cost estimate
    assert timed[:4] == ["a", "b", "b", "a"]  # the order alternates each round
    assert fast["a"]["calls"] == fast["b"]["calls"] == len(timed) // 2
    assert 3 < fast["a"]["calls"] <= 30  # small rows get more than --iters rounds, at most 10x
    assert fast["a"]["wall_ms"] > fast["b"]["wall_ms"] > 0.4
    order.clear()
    slow = bench.time_calls({"a": fn("a", 0.03)}, 3, torch.device("cpu"))
    assert slow["a"]["calls"] == 3  # a row past ROW_SECONDS runs --iters rounds


def test_e2e_compare_settings_interleave_in_their_environment(monkeypatch):
    """bench/e2e_step.py --compare: each setting's environment and checkpoint_every hold during its
    steps only, two untimed steps each come first, and the order alternates every round."""
    import pytest

    bench = load_bench("e2e_step")
    assert bench.parse_setting("default") == {}
    assert bench.parse_setting("grouped=0,every=16") == {"grouped": "0", "every": 16}
    assert bench.parse_setting("batched=0") == {"batched": "0"}
    for bad in ("grouped=2", "every=0", "every=x", "fast=1", "grouped=1,grouped=0", "grouped", "batched=2"):
        with pytest.raises(ValueError):
            bench.parse_setting(bad)
    monkeypatch.setenv("TAICHI_MPM_GROUPED_SUBSTEPS", "1")
    seen = []
    times, probes = bench.interleaved(lambda checkpoint_every, batched, keep_last_segment: seen.append(
        (checkpoint_every, batched, keep_last_segment, bench.os.environ["TAICHI_MPM_GROUPED_SUBSTEPS"])),
        {"a": {}, "b": {"grouped": "0", "every": 8, "batched": "0", "keep": "0"}}, rounds=3)
    a, b = (None, True, True, "1"), (8, False, False, "0")
    assert seen == [a, a, b, b] + [a, b, b, a, a, b]
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3} and len(probes) == 3
    assert bench.os.environ["TAICHI_MPM_GROUPED_SUBSTEPS"] == "1"  # restored
