"""bench/ncu_table.py: reading Nsight Compute's raw page (the GPU run itself needs ncu and a GPU)."""
import pytest

from conftest import load_bench

ncu_table = load_bench("ncu_table")

# excerpt of `ncu --import R --page raw --print-units base` (H200, 2026-11-27)
RAW = """[684] python3.12@127.0.0.1
  substep_forward_c118_0_kernel_2_serial (1, 1, 1)x(1, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
  Metric Name                                                     Metric Unit         Metric Value
  ---------------------------------------------------------- --------------- --------------------
  gpu__time_duration.sum                                                  ns                2,976
  launch__registers_per_thread                               register/thread                   30
  substep_forward_c118_0_kernel_3_range_for (8448, 1, 1)x(128, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
  Metric Name                                                     Metric Unit         Metric Value
  ---------------------------------------------------------- --------------- --------------------
  LTS.TriageCompute.lts__throughput.avg.pct_of_peak_sustained_elapsed      %
  gpu__time_duration.sum                                                  ns              412,160
  l1tex__t_sectors_pipe_lsu_mem_local_op_st.sum                       sector           30,990,408
  launch__registers_per_thread                               register/thread                   72
  lts__throughput.avg.pct_of_peak_sustained_elapsed                        %                84.64
"""


def test_raw_page_gives_each_launch_its_metrics():
    launches = ncu_table.parse_raw(RAW)
    assert [name for name, _ in launches] == ["substep_forward_c118_0_kernel_2_serial",
                                              "substep_forward_c118_0_kernel_3_range_for"]
    first, second = launches[0][1], launches[1][1]
    assert first["gpu__time_duration.sum"] == 2976 and first["launch__registers_per_thread"] == 30
    assert second["gpu__time_duration.sum"] == 412160
    assert second["l1tex__t_sectors_pipe_lsu_mem_local_op_st.sum"] == 30990408
    assert second["lts__throughput.avg.pct_of_peak_sustained_elapsed"] == 84.64
    assert "LTS.TriageCompute.lts__throughput.avg.pct_of_peak_sustained_elapsed" not in second  # no value


def test_table_scales_units_and_marks_missing_metrics():
    text = ncu_table.table(ncu_table.parse_raw(RAW))
    header, first, second = text.splitlines()
    assert header.split()[:3] == ["kernel", "us", "L2"]
    cells = second.split()
    assert cells[0] == "substep_forward_c118_0_kernel_3_range_for"
    assert cells[1] == "412.16"  # ns -> us
    assert cells[2] == "84.64"
    assert "30.99" in cells  # local store sectors, in millions
    assert "-" in first.split()  # the serial launch has no L2 figure


def test_a_workload_or_a_command_is_needed(capsys):
    with pytest.raises(SystemExit) as e:
        ncu_table.main([])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        ncu_table.main(["--", "python3", "x.py"])  # a command without --kernels
    assert e.value.code == 2
    assert "--kernels REGEX is needed" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        ncu_table.main(["mpm_forward", "--kernels", "k", "--", "python3", "x.py"])  # both
    assert e.value.code == 2


def test_without_ncu_the_error_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("PATH", "")
    with pytest.raises(SystemExit) as e:
        ncu_table.main(["--kernels", "k", "--", "python3", "x.py"])
    assert e.value.code == 2
    assert "ncu (Nsight Compute) is not on PATH" in capsys.readouterr().err

def test_a_cpp_kernel_name_with_spaces_is_one_launch():
    """A peer's C++ kernel (gsplat's) prints its whole signature, spaces included; the old pattern
    (\\S+ before the launch shape) matched no line of it, and the table came out empty."""
    raw = ("  void gsplat::rasterize_to_pixels_3dgs_bwd_kernel<3u, float>(unsigned int, unsigned int, const float *) "
           "(120, 68, 8)x(16, 16, 1), Context 1, Stream 7, Device 0, CC 9.0\n"
           "  gpu__time_duration.sum                                                  ns              4,727\n")
    assert ncu_table.parse_raw(raw) == [("gsplat::rasterize_to_pixels_3dgs_bwd_kernel", {"gpu__time_duration.sum": 4727.0})]
