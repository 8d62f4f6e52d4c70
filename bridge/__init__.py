"""Torch face of the package: autograd Functions, nn.Modules and the differentiable rollout.

Layering (bottom up, nothing imports upward): ``taichi_mpm.runtime`` / ``taichi_mpm.launch`` (the
Taichi start-up and the launcher) -> kernels (``taichi_mpm``, ``render``) -> ``bridge`` -> ``scenes``.
The runtime controls are re-exported here because users call ``bridge.init`` first.
``bridge.distributed`` (torchrun helpers) is imported on its own: it must run before CUDA starts.
"""
from taichi_mpm.runtime import ENV_VAR, RuntimeConflictError, arch, device, ensure_init, init

from .gaussian_model import GaussianModel
from .gaussian_sim import Splats, advect_splats, bind_splats, fill_splats, load_splats, splats_to_ply
from .inria import GaussianRasterizationSettings, GaussianRasterizer
from .modules import PhysicalParameters
from .physics_scene import Body, PhysicsScene
from .rasterization import rasterize
from .rollout import (CheckpointPlan, RolloutScene, Trajectory, aux_per_particle, grid_mass, material_per_particle, plan_for,
                      simulate)
from .splat2d import GaussianImage, splat2d
from .surface import Gaussians, particles_to_gaussians
from .transient import (TransientRenderer, r_range_of_bins, render_transient, transient_gaussians, transient_grid,
                        transient_reference)
from .upsampling import SurfaceBinding, SurfaceConfig, SurfaceUpsampler, bind_surface, synthesize_surface

__all__ = ["ENV_VAR", "RuntimeConflictError", "arch", "device", "ensure_init", "init",
           "GaussianModel", "Splats", "advect_splats", "bind_splats", "fill_splats", "load_splats", "splats_to_ply",
           "GaussianRasterizationSettings", "GaussianRasterizer", "PhysicalParameters", "Body", "PhysicsScene",
           "rasterize", "CheckpointPlan", "RolloutScene", "Trajectory", "aux_per_particle", "grid_mass", "material_per_particle",
           "plan_for", "simulate", "GaussianImage", "splat2d", "Gaussians", "particles_to_gaussians",
           "TransientRenderer", "r_range_of_bins", "render_transient", "transient_gaussians", "transient_grid",
           "transient_reference", "SurfaceBinding", "SurfaceConfig", "SurfaceUpsampler", "bind_surface",
           "synthesize_surface"]
