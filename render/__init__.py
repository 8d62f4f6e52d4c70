"""Rendering: cameras, 3D Gaussian splatting kernels (projection, tile binning, blending), PLY files.

The torch-facing functions live in bridge (bridge.rasterize, bridge.inria); this package holds the
Taichi kernels and plain helpers. Kernel modules: projection.py (preprocess), binning.py (tile
binning shared by every splatting renderer), blending.py (per-tile alpha blending), sh.py.
"""
from .binning import Binning, TileGrid, TooManyPairsError, bin_rects
from .camera import Camera, stack_cameras
from .ply import GaussianPly, read_ply, write_ply
from .reference import reference_rasterize

__all__ = ["Binning", "Camera", "GaussianPly", "TileGrid", "TooManyPairsError", "bin_rects", "read_ply",
           "reference_rasterize", "stack_cameras", "write_ply"]
