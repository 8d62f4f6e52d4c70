"""Rendering kernels and plain helpers: cameras, 3D and 2D Gaussian splatting, transient NLOS, PLY files.

The torch-facing functions live in bridge (bridge.rasterize, bridge.splat2d, bridge.render_transient);
this package holds the Taichi kernels, their float64 / pure-torch references and I/O. Stages:
projection.py (3D preprocess), splat2d.py (2D preprocess), binning.py (tile binning shared by every
splatting renderer, the transient one included), blending.py (per-tile blending: alpha compositing
or an order-free sum), sh.py, transient.py (NLOS transient rendering), nlos_io.py (capture files),
backprojection.py (the classical NLOS baseline).
"""
from .backprojection import backproject, depth_from_volume
from .binning import TILE_SIZE, Binning, TileGrid, TooManyPairsError, bin_rects
from .blending import BlendConfig
from .camera import Camera, stack_cameras
from .nlos_io import NLOSCapture, NLOSFormatError, load_capture, load_fk_mat, load_zaragoza_hdf5
from .ply import GaussianPly, read_ply, write_ply
from .projection import ProjectionConfig
from .reference import reference_rasterize
from .reference2d import reference_splat2d
from .transient import SPEED_OF_LIGHT, TransientGrid

__all__ = ["backproject", "depth_from_volume", "TILE_SIZE", "Binning", "TileGrid", "TooManyPairsError", "bin_rects",
           "BlendConfig", "Camera", "stack_cameras", "NLOSCapture", "NLOSFormatError", "load_capture", "load_fk_mat",
           "load_zaragoza_hdf5", "GaussianPly", "read_ply", "write_ply", "ProjectionConfig", "reference_rasterize",
           "reference_splat2d", "SPEED_OF_LIGHT", "TransientGrid"]
