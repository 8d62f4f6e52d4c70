"""A small multi-recording material fit, run in one process or split over torchrun ranks.

K recordings of one elastic cube (same material, different initial velocity fields: a drift plus a
random velocity gradient, so the cube deforms and the loss depends on E and nu) share the learnable
(log E, nu logit); each recording's loss is the squared distance of its final positions to a fixed
target. The loss is normalised by the global K, so summing gradients over ranks gives the
one-process gradient. ``python -m torch.distributed.run --nproc_per_node=2 tests/multi_recording.py OUT``
writes rank 0's summed gradient to OUT (a .pt file).
"""
import sys

import torch

K = 5                 # recordings: not a multiple of 2, so the shards are uneven
T = 12                # substeps per recording
f64 = torch.float64


def build():
    """(params module, x0 [N, 3], recordings: list of (v0 [N, 3], target offset [3]))."""
    from bridge import PhysicalParameters, RolloutScene
    from taichi_mpm import Elastic, MPMSolver

    solver = MPMSolver(res=12, dtype="float64")
    solver.add_cube((0.35, 0.35, 0.35), (0.25, 0.25, 0.25), Elastic(E=1e4, nu=0.3), particles_per_cell=1)
    scene = RolloutScene.from_solver(solver, dt=2e-3)
    params = PhysicalParameters(scene, E=1.5e4, nu=0.25, learn=("E", "nu"))
    g = torch.Generator().manual_seed(3)
    x0 = solver.positions(as_torch=True).clone()
    centred = (x0 - x0.mean(0)).cpu()
    recordings = [(torch.randn(3, generator=g, dtype=f64) + centred @ (3.0 * torch.randn(3, 3, generator=g, dtype=f64)),
                   0.01 * torch.randn(3, generator=g, dtype=f64)) for _ in range(K)]
    return params, x0, recordings


def loss_over(params, x0, recordings, total: int) -> torch.Tensor:
    """Sum over the given recordings of |x_T - (x0 + offset)|^2, divided by the global count."""
    from bridge import simulate

    loss = torch.zeros((), dtype=f64, device=x0.device)
    for velocity, offset in recordings:
        v0 = velocity.to(x0.device)
        traj = simulate(params.scene, x0, v0, params.material(), T, [T])
        loss = loss + ((traj.x[-1] - x0 - offset.to(x0.device)) ** 2).sum()
    return loss / total


def main(out: str) -> None:
    from bridge import distributed

    info = distributed.setup(arch="cpu")
    params, x0, recordings = build()
    mine = distributed.shard(recordings, info)
    loss = loss_over(params, x0, mine, total=len(recordings))
    loss.backward()
    distributed.sum_gradients(params.parameters(), info)
    total_loss = distributed.all_sum(loss, info)
    if info.is_main:
        torch.save({"loss": total_loss, "world": info.world_size, "counts": len(mine),
                    **{name: p.grad for name, p in params.named_parameters()}}, out)
    distributed.cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
