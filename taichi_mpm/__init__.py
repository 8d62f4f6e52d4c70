"""taichi_mpm: 3D MLS-MPM simulation in Taichi (CPU and CUDA), built for differentiable rollouts.

Public API: :class:`MPMSolver`, :class:`SimulationError`, the materials (:class:`Elastic`,
:class:`VonMises`, :class:`Snow`, :class:`Sand`, :class:`Fluid`) and colliders (:class:`Plane`,
:class:`Sphere`, :class:`Box`). The substep kernels and their conventions: ``taichi_mpm.substep``.
"""
from .boundary import Box, Plane, Sphere
from .materials import Elastic, Fluid, Sand, Snow, VonMises
from .solver import MPMSolver, SimulationError

__all__ = ["MPMSolver", "SimulationError", "Elastic", "VonMises", "Snow", "Sand", "Fluid",
           "Plane", "Sphere", "Box"]
