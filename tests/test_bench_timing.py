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
