"""The shared-memory P2G (taichi_mpm.block_scatter, CUDA only) against the plain kernels: the same
grid momentum and mass, and the same particle state from the fused stress + P2G, for particle orders
where every block's tile fits (lattice order, as a sampled mesh or a sorted solver stores them),
where none fits (shuffled: every block falls back to global atomics) and a mix, with a particle
count that leaves the last block part idle, in float32 and float64.

Tolerance: the two kernels add the same terms in different orders (shared then global atomics
against global atomics), so a node's sum differs by rounding: at most (terms per node, <= 64 here)
roundings of the largest term, i.e. 64 eps of max |grid|.

Shown to catch (each alone, on an H200): the tile's mass channel halved in tile_add; the flush's
node index with extent[1] and extent[2] swapped; the fallback branch dropped (shuffled and mixed
orders fail).
"""
import numpy as np
import pytest
import torch

from conftest import tolerance

RES = 40
BOX = (0.2, 0.7)  # the particle lattice, 2 particles per cell and axis


@pytest.fixture(scope="module")
def kernels(ti_arch):
    if ti_arch != "cuda":
        pytest.skip("shared-memory P2G is CUDA-only: run the suite with TAICHI_MPM_ARCH=cuda "
                    "(bench/gpu_session.sh tests)")
    import taichi as ti
    from taichi_mpm.substep import substep_kernels

    return {torch.float32: substep_kernels(ti.f32, plastic_models=False),
            torch.float64: substep_kernels(ti.f64, plastic_models=False)}


def test_tiled_p2g_on_cuda_for_large_scenes(ti_arch, monkeypatch):
    from taichi_mpm.substep import TILED_P2G_MIN_PARTICLES, tiled_p2g

    on_cuda = ti_arch == "cuda"
    monkeypatch.delenv("TAICHI_MPM_TILED_P2G", raising=False)
    assert tiled_p2g(TILED_P2G_MIN_PARTICLES) == on_cuda
    assert not tiled_p2g(TILED_P2G_MIN_PARTICLES - 1)
    monkeypatch.setenv("TAICHI_MPM_TILED_P2G", "1")
    assert tiled_p2g(1) == on_cuda
    monkeypatch.setenv("TAICHI_MPM_TILED_P2G", "0")
    assert not tiled_p2g(10 * TILED_P2G_MIN_PARTICLES)


def test_tiled_solver_steps_match_plain(kernels, monkeypatch):
    """The whole substep kernel (substep_forward) with the tiled P2G, through the solver: a cube in
    lattice order falling for a frame, against the plain kernel. Rounding of the reordered sums grows
    over the substeps, hence the looser tolerance than the one-kernel tests. Shown to catch the tile's
    mass channel halved in tile_add (H200: the tiled run left the domain at substep 8)."""
    from taichi_mpm import Elastic, MPMSolver

    results = []
    for setting in ("0", "1"):
        monkeypatch.setenv("TAICHI_MPM_TILED_P2G", setting)
        solver = MPMSolver(res=RES, dtype="float32")
        solver.add_cube((0.3, 0.3, 0.3), (0.3, 0.3, 0.3), Elastic(E=2e4, nu=0.3), particles_per_cell=8,
                        velocity=(0.5, -1.0, 0.2))
        assert solver.tiled == (setting == "1")
        substeps = solver.step(1.0 / 60)
        results.append((substeps, solver.positions(as_torch=True).cpu(), solver.velocities(as_torch=True).cpu(),
                        solver.deformation_gradients(as_torch=True).cpu()))
    (n_ref, *ref), (n, *ours) = results
    assert n == n_ref > 3
    for name, a, b in zip(("x", "v", "F"), ours, ref):
        err, scale = float((a - b).abs().max()), float(b.abs().max())
        assert err <= 1e-4 * scale, f"{name}: max difference {err:.3g} of max {scale:.3g}"


def particles(order: str, dtype, device) -> dict:
    g = torch.Generator().manual_seed(3)
    dx = 1.0 / RES
    side = torch.arange(BOX[0] + 0.25 * dx, BOX[1], 0.5 * dx, dtype=torch.float64)
    x = torch.stack(torch.meshgrid(side, side, side, indexing="ij"), -1).reshape(-1, 3)
    x = x[: len(x) - 37]  # the last block part idle
    x = x + 0.2 * dx * (torch.rand(x.shape, generator=g, dtype=torch.float64) - 0.5)
    n = len(x)
    perm = torch.randperm(n, generator=g)
    if order == "shuffled":
        x = x[perm]
    elif order == "mixed":  # the first half in lattice order, the second half shuffled
        half = n // 2
        x = torch.cat([x[:half], x[half:][torch.randperm(n - half, generator=g)]])
    state = dict(x=torch.stack([x, x]), v=torch.randn(2, n, 3, generator=g, dtype=torch.float64),
                 C=torch.randn(2, n, 3, 3, generator=g, dtype=torch.float64),
                 F=torch.eye(3, dtype=torch.float64) + 0.05 * torch.randn(2, n, 3, 3, generator=g, dtype=torch.float64),
                 plastic=torch.ones(2, n, dtype=torch.float64),
                 E=1e4 * (1 + torch.rand(n, generator=g, dtype=torch.float64)), nu=torch.full((n,), 0.3, dtype=torch.float64),
                 density=1e3 * (1 + torch.rand(n, generator=g, dtype=torch.float64)),
                 volume=torch.full((n,), (0.5 * dx) ** 3, dtype=torch.float64),
                 affine=torch.randn(n, 3, 3, generator=g, dtype=torch.float64), aux=torch.zeros(n, 4, dtype=torch.float64),
                 dFc=torch.zeros(1, 3, 3, dtype=torch.float64))
    state = {k: t.to(device=device, dtype=dtype).contiguous() for k, t in state.items()}
    state["material"] = torch.zeros(n, dtype=torch.int32, device=device)  # fixed-corotated
    return state


def empty_grid(dtype, device):
    return torch.zeros(3, RES, RES, RES, dtype=dtype, device=device), torch.zeros(RES, RES, RES, dtype=dtype, device=device)


def assert_grids_close(ours, ref, dtype):
    for name, a, b in zip(("momentum", "mass"), ours, ref):
        scale = float(b.abs().max())
        assert scale > 0
        err = float((a - b).abs().max())
        assert err <= tolerance(dtype, 64) * scale, f"{name}: max error {err:.3g} of max {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("order", ["lattice", "shuffled", "mixed"])
def test_tiled_p2g_matches_plain(kernels, device, order, dtype):
    import taichi as ti

    k, s = kernels[dtype], particles(order, dtype, device)
    n = len(s["E"])
    grids = []
    for tiled in (False, True):
        mv, m = empty_grid(dtype, device)
        k.p2g(0, n, s["x"], s["v"], s["density"], s["volume"], s["affine"], mv, m, ti.Vector([0.0, 0.0, 0.0]),
              float(RES), tiled)
        grids.append((mv, m))
    assert_grids_close(grids[1], grids[0], dtype)


@pytest.mark.parametrize("order", ["lattice", "shuffled"])
def test_tiled_stress_p2g_matches_plain(kernels, device, order):
    import taichi as ti

    dtype = torch.float32
    k, base = kernels[dtype], particles(order, dtype, device)
    n = len(base["E"])
    results = []
    for tiled in (False, True):
        s = {key: t.clone() for key, t in base.items()}
        mv, m = empty_grid(dtype, device)
        k.stress_p2g(0, 1, n, s["x"], s["v"], s["C"], s["F"], s["plastic"], s["material"], s["E"], s["nu"],
                     s["density"], s["volume"], s["aux"], s["dFc"], 0.0, mv, m, ti.Vector([0.0, 0.0, 0.0]),
                     float(RES), 1e-4, tiled)
        results.append((s["F"][1], s["plastic"][1], mv, m))
    (F_ref, plastic_ref, *grid_ref), (F, plastic, *grid) = results
    np.testing.assert_allclose(F.cpu().numpy(), F_ref.cpu().numpy(), rtol=tolerance(dtype, 4), atol=tolerance(dtype, 4))
    assert torch.equal(plastic, plastic_ref)
    assert_grids_close(grid, grid_ref, dtype)
