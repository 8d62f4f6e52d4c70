"""Preprocess stage of 2D Gaussian splatting (image fitting): Cholesky factors -> conics and tiles.

A 2D Gaussian has a mean (x, y) in pixels (pixel (px, py) has its centre at (px + 0.5, py + 0.5)), a
lower-triangular Cholesky factor L = [[l0, 0], [l1, l2]] of its covariance cov = L L^T, colours and an
opacity. One kernel computes, for every Gaussian, conic = cov^-1 (stored xx, xy, yy as the 3D
projection does) and the tile rectangle where alpha can reach 1/255 (|d|_conic <= sqrt(2 ln(255 op)),
whose bounding box has half-widths r*sqrt(cov_xx), r*sqrt(cov_yy)), so that the shared binning
(render/binning.py) and blending (render/blending.py) kernels of the 3D rasterizer do the rest.
Its backward turns dL/dconic into dL/dL: conic = cov^-1 gives dL/dcov = -conic G conic (G the
symmetric dL/dconic), and cov = L L^T gives dL/dL = 2 (dL/dcov) L, lower triangle.
"""

import functools
from typing import Optional

import taichi as ti

from taichi_mpm.launch import TorchKernel

from .binning import TILE_SIZE as TILE
from .lanes import for_items, item_lanes
from .projection import ALPHA_MIN
from .splat_record import CONIC, GEOMETRY, MEAN, OPACITY

nd = ti.types.ndarray


@ti.func
def _cov_conic(chol: ti.template(), n):
    """(L, conic matrix, det cov) of Gaussian n."""
    L = ti.Matrix([[chol[n, 0], 0.0], [chol[n, 1], chol[n, 2]]])
    cov = L @ L.transpose()
    det = cov[0, 0] * cov[1, 1] - cov[0, 1] * cov[0, 1]
    conic = ti.Matrix([[cov[1, 1], -cov[0, 1]], [-cov[0, 1], cov[0, 0]]]) / det
    return L, cov, conic, det


def preprocess_kernels(lanes: Optional[int] = None):
    """(forward, backward) TorchKernels of the 2D preprocess stage (cached).

    forward(means (N, 2), chol (N, 3), opacities (N,), colors (N, K), width, height,
            splats (N, GEOMETRY + K) out: the records the blend kernels read (render/splat_record.py),
            rects (N, 4) int32 out, pair_counts (N,) int32 out)
    backward(chol (N, 3), rects (N, 4) int32, v_splats (N, GEOMETRY + K): the blend backward's, of which
             it reads the conic columns, v_chol (N, 3) out)
    One image: its N Gaussians are the blend kernels' items.
    lanes: the item loops' form (render/lanes.py); None takes the arch's.
    """
    return _preprocess_kernels(item_lanes() if lanes is None else lanes)


@functools.cache
def _preprocess_kernels(lanes: int):
    @ti.func
    def forward_one(n, means: ti.template(), chol: ti.template(), opacities: ti.template(), colors: ti.template(),
                    width, height, splats: ti.template(), rects: ti.template(), pair_counts: ti.template()):
        tiles_x = (width + TILE - 1) // TILE
        tiles_y = (height + TILE - 1) // TILE
        _, cov, conic, det = _cov_conic(chol, n)
        op = opacities[n]
        rect = ti.math.ivec4(0)
        if det > 0.0 and op >= ALPHA_MIN:
            mx, my = means[n, 0], means[n, 1]
            extent = ti.sqrt(2.0 * ti.log(255.0 * op))
            rx = extent * ti.sqrt(cov[0, 0])
            ry = extent * ti.sqrt(cov[1, 1])
            # pixels whose centre lies within [mean - r, mean + r], clipped before the integer
            # conversion so that huge or far-away Gaussians cannot overflow it
            px0 = ti.cast(ti.ceil(ti.min(ti.max(mx - rx - 0.5, 0.0), width * 1.0)), ti.i32)
            px1 = ti.cast(ti.floor(ti.max(ti.min(mx + rx - 0.5, width - 1.0), -1.0)), ti.i32)
            py0 = ti.cast(ti.ceil(ti.min(ti.max(my - ry - 0.5, 0.0), height * 1.0)), ti.i32)
            py1 = ti.cast(ti.floor(ti.max(ti.min(my + ry - 0.5, height - 1.0), -1.0)), ti.i32)
            if px0 <= px1 and py0 <= py1:
                rect = ti.math.ivec4(px0 // TILE, py0 // TILE,
                                     ti.min(px1 // TILE + 1, tiles_x), ti.min(py1 // TILE + 1, tiles_y))
        splats[n, MEAN], splats[n, MEAN + 1] = means[n, 0], means[n, 1]
        splats[n, CONIC], splats[n, CONIC + 1], splats[n, CONIC + 2] = conic[0, 0], conic[0, 1], conic[1, 1]
        splats[n, OPACITY] = op
        for k in range(colors.shape[1]):
            splats[n, GEOMETRY + k] = colors[n, k]
        for k in ti.static(range(4)):
            rects[n, k] = rect[k]
        pair_counts[n] = (rect[2] - rect[0]) * (rect[3] - rect[1])

    @ti.kernel
    def forward(means: nd(ti.f32, ndim=2), chol: nd(ti.f32, ndim=2), opacities: nd(ti.f32, ndim=1),
                colors: nd(ti.f32, ndim=2), width: ti.i32, height: ti.i32,
                splats: nd(ti.f32, ndim=2), rects: nd(ti.i32, ndim=2), pair_counts: nd(ti.i32, ndim=1)):
        for_items(means.shape[0], lanes, forward_one, (means, chol, opacities, colors, width, height, splats,
                  rects, pair_counts))

    @ti.func
    def backward_one(n, chol: ti.template(), rects: ti.template(), v_splats: ti.template(),
                     v_chol: ti.template()):
        v_L = ti.Matrix.zero(ti.f32, 2, 2)
        if rects[n, 2] > rects[n, 0] and rects[n, 3] > rects[n, 1]:  # blended somewhere
            L, _, conic, _ = _cov_conic(chol, n)
            v_conic = ti.math.vec3([v_splats[n, CONIC + k] for k in ti.static(range(3))])
            G = ti.Matrix([[v_conic[0], 0.5 * v_conic[1]], [0.5 * v_conic[1], v_conic[2]]])
            v_cov = -(conic @ G @ conic)
            v_L = 2.0 * v_cov @ L
        v_chol[n, 0], v_chol[n, 1], v_chol[n, 2] = v_L[0, 0], v_L[1, 0], v_L[1, 1]

    @ti.kernel
    def backward(chol: nd(ti.f32, ndim=2), rects: nd(ti.i32, ndim=2), v_splats: nd(ti.f32, ndim=2),
                 v_chol: nd(ti.f32, ndim=2)):
        for_items(chol.shape[0], lanes, backward_one, (chol, rects, v_splats, v_chol))

    return TorchKernel(forward), TorchKernel(backward)
