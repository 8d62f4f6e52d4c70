"""bench/ptx_registers.py: ptxas -v's log read into rows, per PTX file, for the dump's GPU."""
import stat

import pytest

from conftest import load_bench

# ptxas 12.9's -v output for one module of the blend kernels (trimmed), 2026-11-28
LOG = """ptxas warning : Unresolved extern variable 'shared_array_47' in whole program compilation, ignoring extern qualifier
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'backward_cuda_c88_0_kernel_1_range_for' for 'sm_90'
ptxas info    : Function properties for backward_cuda_c88_0_kernel_1_range_for
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 67 registers, used 1 barriers, 10240 bytes smem
ptxas info    : Compile time = 19.892 ms
ptxas info    : Compiling entry function 'backward_c82_0_kernel_1_range_for' for 'sm_90'
ptxas info    : Function properties for backward_c82_0_kernel_1_range_for
    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 255 registers
"""


def test_log_rows_and_blocks_per_sm():
    pr = load_bench("ptx_registers")
    rows = pr.parse_ptxas(LOG)
    assert [(r["kernel"], r["arch"], r["registers"], r["spill_store_bytes"], r["spill_load_bytes"],
             r["shared_bytes"]) for r in rows] == [
        ("backward_cuda_c88_0_kernel_1_range_for", "sm_90", 67, 0, 0, 10240),
        ("backward_c82_0_kernel_1_range_for", "sm_90", 255, 12, 16, 0)]
    # a thread's registers round up to 8: 50 take 56 (four 256-thread blocks, not five), 65 take 72 (three)
    assert [pr.blocks_per_sm(r) for r in (48, 50, 56, 64, 65, 72, 255)] == [5, 4, 4, 4, 3, 3, 1]


def test_count_runs_ptxas_per_file_for_the_dumps_gpu(tmp_path):
    pr = load_bench("ptx_registers")
    fake = tmp_path / "ptxas"  # records its arguments, answers with LOG on stderr as ptxas does
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/calls\ncat >&2 <<'END'\n{LOG}END\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    ptx = tmp_path / "ptx"
    ptx.mkdir()
    for name in ("taichi_kernel_nvptx_0000.ptx", "taichi_kernel_nvptx_0001.ptx"):
        (ptx / name).write_text("//\n.version 6.3\n.target sm_86\n.address_size 64\n")
    rows = pr.count(ptx, str(fake))
    assert len(rows) == 4 and {r["file"] for r in rows} == {"taichi_kernel_nvptx_0000.ptx",
                                                            "taichi_kernel_nvptx_0001.ptx"}
    assert all("-arch=sm_86" in line for line in (tmp_path / "calls").read_text().splitlines())
    (ptx / pr.ARCH_FILE).write_text("sm_90\n")  # the GPU the dump ran on wins over the PTX's .target
    pr.count(ptx, str(fake))
    assert (tmp_path / "calls").read_text().splitlines()[-1].startswith("-v -arch=sm_90 ")
    (ptx / "bad.ptx").write_text("not ptx\n")
    with pytest.raises(SystemExit, match="no .target line"):
        pr.count(ptx, str(fake))
