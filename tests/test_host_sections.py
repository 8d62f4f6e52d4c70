"""bench/host_sections.py: the stage timers wrap what a render call runs through and leave it as it was."""
import torch

from conftest import load_bench


def test_stages_are_timed_nested_and_unpatched_after(ti_arch, device):
    """Each stage of a 2D splat forward+backward shows up once a call, a launch inside its autograd
    stage costs no more than that stage, and the call's time splits into stages plus the rest.
    Shown to catch nested stages counted twice in the split (binning runs inside _Splat2D.forward)."""
    hs = load_bench("host_sections")
    from bridge.splat2d import _Splat2D, splat2d
    from taichi_mpm.launch import TorchKernel

    originals = (TorchKernel.__dict__["__call__"], TorchKernel.__dict__["_launch"], _Splat2D.__dict__["forward"],
                 _Splat2D.__dict__["backward"])
    g = torch.Generator().manual_seed(0)
    n, w, h = 40, 24, 20
    leaves = [t.to(device).requires_grad_(True) for t in (
        torch.rand(n, 2, generator=g) * torch.tensor([w, h], dtype=torch.float32),
        torch.tensor([3.0, 0.5, 2.0]).repeat(n, 1), torch.rand(n, 3, generator=g), torch.rand(n, generator=g))]

    def call():
        image, _ = splat2d(leaves[0], leaves[1], leaves[2], w, h, leaves[3], mode="alpha", validate=False)
        image.sum().backward()

    medians = hs.sections(call, calls=3)
    assert {"_Splat2D.forward", "_Splat2D.backward", "binning (waits for the pair count)", hs.OUTSIDE, "call",
            "call + sync"} <= set(medians)
    # one blend launch each way: forward/backward on the CPU, forward_cuda/backward_cuda (tile per block) on CUDA
    blend_launches = {direction: [name for name in medians if name.startswith(f"launch blending.{direction}")]
                      for direction in ("forward", "backward")}
    assert all(len(names) == 1 for names in blend_launches.values()), blend_launches
    assert medians[blend_launches["backward"][0]] <= medians["_Splat2D.backward"]
    launches = sum(us for name, us in medians.items() if name.startswith("launch "))
    assert 0 < medians[hs.TAICHI_LAUNCH] < launches  # Taichi's part of the launches, not all of them
    stages = medians["_Splat2D.forward"] + medians["_Splat2D.backward"]
    assert 0 <= medians[hs.OUTSIDE] <= medians["call"] - 0.9 * stages
    assert (TorchKernel.__dict__["__call__"], TorchKernel.__dict__["_launch"], _Splat2D.__dict__["forward"],
            _Splat2D.__dict__["backward"]) == originals
