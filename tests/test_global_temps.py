"""bench/global_temps.py: Taichi's global temporaries read from print_ir output, misaligned 8-byte ones found."""
from conftest import load_bench

# print_ir output (trimmed): two dumps of one kernel, then another kernel; the pair kernel's float64
# temporaries at 156-172 B are those of the first version of substep_forward_pair, which failed on
# CUDA with CUDA_ERROR_MISALIGNED_ADDRESS (2026-11-28)
IR = """[I 11/28/26 10:14:43.759 19628] [ir_printer.cpp:operator()@993] [substep_forward_pair_c126_0] Offloaded:
kernel {
    <*i32> $28 = global tmp var (offset = 12 B)
}
[I 11/28/26 10:14:43.760 19628] [ir_printer.cpp:operator()@993] [substep_forward_pair_c126_0.simplify] die:
kernel {
    <*i32> $28 = global tmp var (offset = 12 B)
    <*f64> $132 = global tmp var (offset = 40 B)
    <*i32> $133 = global tmp var (offset = 152 B)
    <*f64> $134 = global tmp var (offset = 156 B)
    <*[Tensor (3) f64]> $135 = global tmp var (offset = 164 B)
    <*f64> $132 = global tmp var (offset = 40 B)
}
[I 11/28/26 10:14:43.761 19628] [ir_printer.cpp:operator()@993] [clear_grid_c80_0] Offloaded:
kernel {
    <*i32> $17 = global tmp var (offset = 4 B)
    <*f32> $18 = global tmp var (offset = 8 B)
}
"""


def test_temporaries_of_each_kernels_last_dump_and_the_misaligned_ones():
    gt = load_bench("global_temps")
    temps = gt.temporaries(IR.splitlines(keepends=True))
    assert temps == {"substep_forward_pair": [("i32", 12), ("f64", 40), ("i32", 152), ("f64", 156),
                                              ("[Tensor (3) f64]", 164)],
                     "clear_grid": [("i32", 4), ("f32", 8)]}
    # 4-byte temporaries at 4 mod 8 are fine; 8-byte ones (and tensors of them) are not
    assert gt.misaligned(temps) == {"substep_forward_pair": [("f64", 156), ("[Tensor (3) f64]", 164)]}


def test_reads_taichis_own_output(tmp_path):
    """A kernel that computes a float64 vector at its top level and reads it in its loop: Taichi's
    print_ir output as it is (headers at log level info) gives its temporaries."""
    gt = load_bench("global_temps")
    script = """
import taichi as ti
ti.init(arch=ti.cpu, print_ir=True, offline_cache=False, log_level=ti.INFO)
@ti.func
def scaled(v, s):
    return v * s
@ti.kernel
def top_level_value(a: ti.types.ndarray(ti.f64, ndim=1), o: ti.types.vector(3, ti.f64), s: ti.f64, n: ti.i32):
    w = scaled(o, s)
    for i in range(n):
        a[i] = w[0] + i
import numpy as np
top_level_value(np.zeros(4), ti.Vector([1.0, 2.0, 3.0]), 2.0, 4)
"""
    path = tmp_path / "top_level_value.py"  # a file: Taichi reads a kernel's source
    path.write_text(script)
    temps = gt.temporaries_of([str(path)], tmp_path, "the script")
    kinds = [t for t, _ in temps["top_level_value"]]
    assert any("f64" in t for t in kinds) and "i32" in kinds  # the vector and the loop bound
    assert gt.misaligned(temps) == {}
