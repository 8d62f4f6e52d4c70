"""bench/first_gradient.py: its child script runs each workload in a fresh process on an empty cache."""
import pytest

from conftest import load_bench


def test_every_workload_is_valid_python():
    bench = load_bench("first_gradient")
    for name, body in bench.WORKLOADS.items():
        compile(bench.CHILD.replace("{workload}", body), f"child:{name}", "exec")


def test_splat2d_workload_times_a_cold_then_a_warm_process(tmp_path):
    """The smallest workload end to end (~4 s on 2 cores): it fails if the child cannot build or
    differentiate the README's GaussianImage call."""
    bench = load_bench("first_gradient")
    cache = tmp_path / "cache"
    cache.mkdir()
    cold = bench.measure(bench.ROOT, "elastic", str(cache), workload="splat2d")
    warm = bench.measure(bench.ROOT, "elastic", str(cache), workload="splat2d")
    for run in (cold, warm):
        assert run["forward_s"] > 0 and run["backward_s"] > 0 and run["total_s"] >= run["setup_s"]
    assert cold["cache_files"] > 0  # the cold process filled the cache the warm one read
