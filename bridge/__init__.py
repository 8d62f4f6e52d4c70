"""Torch face of the package: Taichi runtime, autograd Functions, modules, differentiable rollout.

Submodules load on first use, so ``taichi_mpm`` and ``render`` can import ``bridge.runtime``
without pulling in the torch layer that itself imports them.
"""
from __future__ import annotations

import importlib

from .runtime import ENV_VAR, RuntimeConflictError, arch, device, ensure_init, init

# public name -> submodule that defines it; filled in as the torch layer grows
_LAZY: dict[str, str] = {
    "rasterize": "rasterization",
    "GaussianRasterizationSettings": "inria",
    "GaussianRasterizer": "inria",
    "RolloutScene": "rollout",
    "Trajectory": "rollout",
    "simulate": "rollout",
    "grid_mass": "rollout",
    "CheckpointPlan": "rollout",
    "plan_for": "rollout",
    "material_per_particle": "rollout",
    "PhysicalParameters": "modules",
    "Gaussians": "surface",
    "particles_to_gaussians": "surface",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'bridge' has no attribute {name!r}")


__all__ = ["ENV_VAR", "RuntimeConflictError", "arch", "device", "ensure_init", "init", *_LAZY]
