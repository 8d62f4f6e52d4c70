"""taichi_mpm: 3D MLS-MPM simulation in Taichi (CPU and CUDA), built for differentiable rollouts.

Public API: :class:`MPMSolver`, :class:`SimulationError`, the materials (:class:`Elastic`,
:class:`VonMises`, :class:`Snow`, :class:`Sand`, :class:`Fluid`) and colliders (:class:`Plane`,
:class:`Sphere`, :class:`Box`). The substep kernels and their conventions: ``taichi_mpm.substep``.

This package is also the floor every other package stands on: ``taichi_mpm.runtime`` (the one
``ti.init``, matched to torch) and ``taichi_mpm.launch`` (the torch-tensor kernel launcher); they
import nothing else from the project.
"""
from .boundary import Box, Plane, Sphere
from .materials import Elastic, Fluid, Sand, Snow, VonMises
from .solver import MPMSolver, SimulationError

__all__ = ["MPMSolver", "SimulationError", "Elastic", "VonMises", "Snow", "Sand", "Fluid",
           "Plane", "Sphere", "Box"]
