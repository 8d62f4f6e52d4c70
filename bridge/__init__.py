"""Torch face of the package: autograd Functions, nn.Modules and the differentiable rollout.

Layering (bottom up, nothing imports upward): ``taichi_mpm.runtime`` / ``taichi_mpm.launch`` (the
Taichi start-up and the launcher) -> kernels (``taichi_mpm``, ``render``) -> ``bridge`` -> ``scenes``.
The runtime controls are re-exported here because users call ``bridge.init`` first.
"""
from taichi_mpm.runtime import ENV_VAR, RuntimeConflictError, arch, device, ensure_init, init

from .inria import GaussianRasterizationSettings, GaussianRasterizer
from .modules import PhysicalParameters
from .rasterization import rasterize
from .rollout import CheckpointPlan, RolloutScene, Trajectory, grid_mass, material_per_particle, plan_for, simulate
from .surface import Gaussians, particles_to_gaussians

__all__ = ["ENV_VAR", "RuntimeConflictError", "arch", "device", "ensure_init", "init",
           "GaussianRasterizationSettings", "GaussianRasterizer", "PhysicalParameters", "rasterize",
           "CheckpointPlan", "RolloutScene", "Trajectory", "grid_mass", "material_per_particle", "plan_for",
           "simulate", "Gaussians", "particles_to_gaussians"]
