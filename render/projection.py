"""Preprocess stage of 3D Gaussian splatting: 3D Gaussians -> screen-space splats, and its backward.

For every (camera c, Gaussian n): covariance from scale and quaternion (or a given cov3D), EWA
projection with the 0.3 px^2 low-pass dilation (or Mip-Splatting's antialiased mode, which scales
opacity by sqrt(det(cov2D) / det(cov2D + 0.3 I))), SH to RGB, near/far cull, and the exact screen
rectangle where alpha can reach 1/255: |d|_conic <= sqrt(2 ln(255 opacity)), whose bounding box has
half-widths r*sqrt(cov_xx), r*sqrt(cov_yy). Pixel (px, py) has its centre at (px + 0.5, py + 0.5);
intrinsics follow gsplat (mean2D = f * x / z + c).

The backward kernel recomputes the forward quantities (nothing is stored but the tile rectangles) and
chains the screen-space gradients back to means, quaternions, scales or cov3D, opacities and SH, one
thread per Gaussian summing over the cameras.
"""

import functools
from dataclasses import dataclass, replace
from typing import Optional

import taichi as ti

from taichi_mpm.launch import TorchKernel

from .lanes import for_items, item_lanes
from .sh import num_sh_bases, sh_to_rgb, sh_to_rgb_backward
from .splat_record import CONIC, DEPTH, MEAN, OPACITY, PROJECTED, RGB

DILATION = 0.3      # px^2 added to the projected covariance
ALPHA_MIN = 1.0 / 255.0
from .binning import TILE_SIZE as TILE  # noqa: E402  (one tile size for every renderer)

nd = ti.types.ndarray


@ti.func
def _camera(viewmats: ti.template(), Ks: ti.template(), c):
    R = ti.Matrix([[viewmats[c, 0, 0], viewmats[c, 0, 1], viewmats[c, 0, 2]],
                   [viewmats[c, 1, 0], viewmats[c, 1, 1], viewmats[c, 1, 2]],
                   [viewmats[c, 2, 0], viewmats[c, 2, 1], viewmats[c, 2, 2]]])
    t = ti.math.vec3(viewmats[c, 0, 3], viewmats[c, 1, 3], viewmats[c, 2, 3])
    return R, t, Ks[c, 0, 0], Ks[c, 1, 1], Ks[c, 0, 2], Ks[c, 1, 2]


@ti.func
def _rotation(q):
    """Rotation matrix of the normalized quaternion q = (w, x, y, z)."""
    w, x, y, z = q[0], q[1], q[2], q[3]
    return ti.Matrix([[1.0 - 2.0 * (y * y + z * z), 2.0 * (x * y - w * z), 2.0 * (x * z + w * y)],
                      [2.0 * (x * y + w * z), 1.0 - 2.0 * (x * x + z * z), 2.0 * (y * z - w * x)],
                      [2.0 * (x * z - w * y), 2.0 * (y * z + w * x), 1.0 - 2.0 * (x * x + y * y)]])


@ti.func
def _rotation_backward(q, v_R):
    """dL/dq for the normalized quaternion q given dL/dR."""
    w, x, y, z = q[0], q[1], q[2], q[3]
    v_w = 2.0 * (z * (v_R[1, 0] - v_R[0, 1]) + y * (v_R[0, 2] - v_R[2, 0]) + x * (v_R[2, 1] - v_R[1, 2]))
    v_x = 2.0 * (y * (v_R[1, 0] + v_R[0, 1]) + z * (v_R[2, 0] + v_R[0, 2]) + w * (v_R[2, 1] - v_R[1, 2])
                 - 2.0 * x * (v_R[1, 1] + v_R[2, 2]))
    v_y = 2.0 * (x * (v_R[1, 0] + v_R[0, 1]) + w * (v_R[0, 2] - v_R[2, 0]) + z * (v_R[1, 2] + v_R[2, 1])
                 - 2.0 * y * (v_R[0, 0] + v_R[2, 2]))
    v_z = 2.0 * (w * (v_R[1, 0] - v_R[0, 1]) + x * (v_R[0, 2] + v_R[2, 0]) + y * (v_R[1, 2] + v_R[2, 1])
                 - 2.0 * z * (v_R[0, 0] + v_R[1, 1]))
    return ti.math.vec4(v_w, v_x, v_y, v_z)


@ti.func
def _sym3(covars: ti.template(), n):
    a, b, c = covars[n, 0], covars[n, 1], covars[n, 2]
    d, e, f = covars[n, 3], covars[n, 4], covars[n, 5]
    return ti.Matrix([[a, b, c], [b, d, e], [c, e, f]])


@ti.func
def _scale_rotation(quats: ti.template(), scales: ti.template(), n):
    """M = R(q) diag(s), so that cov3D = M M^T; also returns the raw and normalized quaternion."""
    q_raw = ti.math.vec4(quats[n, 0], quats[n, 1], quats[n, 2], quats[n, 3])
    q = q_raw.normalized()
    s = ti.math.vec3(scales[n, 0], scales[n, 1], scales[n, 2])
    R = _rotation(q)
    M = ti.Matrix([[R[i, j] * s[j] for j in ti.static(range(3))] for i in ti.static(range(3))])
    return M, R, s, q, q_raw


@ti.func
def _frustum_limits(fx, fy, cx, cy, width, height):
    """Bounds on x/z, y/z used when building the Jacobian (as Inria and gsplat do: 1.3x the FoV)."""
    tan_x = 0.5 * width / fx
    tan_y = 0.5 * height / fy
    return (cx / fx + 0.3 * tan_x, (width - cx) / fx + 0.3 * tan_x,
            cy / fy + 0.3 * tan_y, (height - cy) / fy + 0.3 * tan_y)


@ti.func
def _cameras_per_scene(N, rows, cameras):
    """C of S scenes of N Gaussians (rows = S*N) seen by `cameras` = S*C cameras."""
    return cameras // (rows // N)


@ti.func
def _scene_row(c, n, N, rows, cameras):
    """The row of the Gaussian arrays holding Gaussian n of camera c's scene."""
    return c // _cameras_per_scene(N, rows, cameras) * N + n


@dataclass(frozen=True)
class ProjectionConfig:
    """What the projection kernels are compiled for; one cached (forward, backward) pair per value.

    sh_degree: 0..3 evaluates SH colours in the kernel; -1 means colours are given (no SH).
    given_cov: read (N, 6) cov3D instead of quaternions and scales.
    antialiased: Mip-Splatting opacity compensation (gsplat's rasterize_mode="antialiased").
    accumulate: several cameras. The backward runs a thread per Gaussian that sums its cameras'
        gradients itself and writes every gradient element once either way (no zero-filled arrays, no
        atomics across threads); with accumulate its SH rows are zeroed first and added to, without
        (one camera) they are written. The forward ignores it.
    """
    sh_degree: int = -1
    given_cov: bool = False
    antialiased: bool = False
    accumulate: bool = True


def projection_kernels(config: ProjectionConfig, lanes: Optional[int] = None):
    """(forward, backward) TorchKernels for one configuration (both cached). lanes: the item loops'
    form (render/lanes.py); None takes the arch's.

    forward(means (S*N, 3), quats (S*N, 4), scales (S*N, 3), covars (S*N, 6), opacities (S*N,),
            sh (S*N, B, 3), viewmats (S*C, 4, 4), Ks (S*C, 3, 3), width, height, near, far,
            splats (S*C, N, PROJECTED) out: the records of render/splat_record.py (zeros where a splat
            is not visible; colour columns only with SH), radii (S*C, N, 2) int32 out, rects
            (S*C*N, 4) int32 out, pair_counts (S*C*N,) int32 out)
    backward(means, quats, scales, covars, opacities, sh, viewmats, Ks, width, height, rects,
             v_splats (S*C, N, PROJECTED) the records' gradients, v_means, v_quats, v_scales, v_covars,
             v_opacities, v_sh (out, every element written))
    S scenes of N Gaussians each, each seen by its own C cameras (S = 1: one scene): camera c sees
    the Gaussians of scene c // C. S follows from the shapes (S*N rows of means against the N of
    the records), so one compiled kernel serves every batch."""
    lanes = item_lanes() if lanes is None else lanes
    return (_forward_kernel(replace(config, accumulate=True), lanes), _backward_kernel(config, lanes))


@ti.func
def _cov3(quats: ti.template(), scales: ti.template(), covars: ti.template(), n, given_cov: ti.template()):
    S = ti.Matrix.zero(ti.f32, 3, 3)
    if ti.static(given_cov):
        S = _sym3(covars, n)
    else:
        M, _R, _s, _q, _q_raw = _scale_rotation(quats, scales, n)
        S = M @ M.transpose()
    return S


@functools.cache
def _forward_kernel(config: ProjectionConfig, lanes: int):
    sh_degree, given_cov, antialiased = config.sh_degree, config.given_cov, config.antialiased

    @ti.func
    def project(idx, means: ti.template(), quats: ti.template(), scales: ti.template(), covars: ti.template(),
                opacities: ti.template(), sh: ti.template(), viewmats: ti.template(), Ks: ti.template(), width,
                height, near, far, splats: ti.template(), radii: ti.template(), rects: ti.template(),
                pair_counts: ti.template()):
        """Item idx = c * N + n: Gaussian n of camera c's scene (row g of the Gaussian arrays)."""
        N = splats.shape[1]
        tiles_x = (width + TILE - 1) // TILE
        tiles_y = (height + TILE - 1) // TILE
        c, n = idx // N, idx % N
        g = _scene_row(c, n, N, means.shape[0], viewmats.shape[0])
        Rv, tv, fx, fy, cx, cy = _camera(viewmats, Ks, c)
        p = ti.math.vec3(means[g, 0], means[g, 1], means[g, 2])
        t = Rv @ p + tv
        visible = False
        mean2d = ti.math.vec2(0.0)
        conic = ti.math.vec3(0.0)
        op = 0.0
        rx, ry = 0.0, 0.0
        rect = ti.math.ivec4(0)
        if t.z >= near and t.z <= far:
            lx0, lx1, ly0, ly1 = _frustum_limits(fx, fy, cx, cy, width, height)
            z = t.z
            u = ti.math.clamp(t.x / z, -lx0, lx1)
            v = ti.math.clamp(t.y / z, -ly0, ly1)
            J = ti.Matrix([[fx / z, 0.0, -fx * u / z], [0.0, fy / z, -fy * v / z]])
            A = J @ Rv
            cov2 = A @ _cov3(quats, scales, covars, g, given_cov) @ A.transpose()
            a = cov2[0, 0] + DILATION
            b = cov2[0, 1]
            d = cov2[1, 1] + DILATION
            det = a * d - b * b
            if det > 0.0:
                comp = 1.0
                if ti.static(antialiased):
                    det_orig = cov2[0, 0] * cov2[1, 1] - b * b
                    comp = ti.sqrt(ti.max(det_orig / det, 0.0))
                op = opacities[g] * comp
                if op >= ALPHA_MIN:
                    mean2d = ti.math.vec2(fx * t.x / z + cx, fy * t.y / z + cy)
                    conic = ti.math.vec3(d / det, -b / det, a / det)
                    extent = ti.sqrt(2.0 * ti.log(255.0 * op))
                    rx = extent * ti.sqrt(a)
                    ry = extent * ti.sqrt(d)
                    # pixels whose centre px + 0.5 lies within [mean - r, mean + r], clipped first
                    # so that huge splats never overflow the integer conversion
                    px0 = ti.cast(ti.ceil(ti.max(mean2d.x - rx - 0.5, 0.0)), ti.i32)
                    px1 = ti.cast(ti.floor(ti.min(mean2d.x + rx - 0.5, width - 1.0)), ti.i32)
                    py0 = ti.cast(ti.ceil(ti.max(mean2d.y - ry - 0.5, 0.0)), ti.i32)
                    py1 = ti.cast(ti.floor(ti.min(mean2d.y + ry - 0.5, height - 1.0)), ti.i32)
                    if px0 <= px1 and py0 <= py1:
                        visible = True
                        rect = ti.math.ivec4(px0 // TILE, py0 // TILE,
                                             ti.min(px1 // TILE + 1, tiles_x), ti.min(py1 // TILE + 1, tiles_y))
        record = ti.Vector.zero(ti.f32, PROJECTED)  # zeros where the splat is not visible
        if visible:
            record[MEAN], record[MEAN + 1] = mean2d.x, mean2d.y
            for k in ti.static(range(3)):
                record[CONIC + k] = conic[k]
            record[OPACITY] = op
            record[DEPTH] = t.z
            radii[c, n, 0] = ti.cast(ti.ceil(ti.min(rx, 1e9)), ti.i32)
            radii[c, n, 1] = ti.cast(ti.ceil(ti.min(ry, 1e9)), ti.i32)
            if ti.static(sh_degree >= 0):
                color = sh_to_rgb(sh, g, p + Rv.transpose() @ tv, sh_degree)
                for ch in ti.static(range(3)):
                    record[RGB + ch] = color[ch]
        else:
            radii[c, n, 0], radii[c, n, 1] = 0, 0
        for k in ti.static(range(PROJECTED)):
            splats[c, n, k] = record[k]
        for k in ti.static(range(4)):
            rects[idx, k] = rect[k]
        pair_counts[idx] = (rect[2] - rect[0]) * (rect[3] - rect[1])

    @ti.kernel
    def forward(means: nd(ti.f32, ndim=2), quats: nd(ti.f32, ndim=2), scales: nd(ti.f32, ndim=2),
                covars: nd(ti.f32, ndim=2), opacities: nd(ti.f32, ndim=1), sh: nd(ti.f32, ndim=3),
                viewmats: nd(ti.f32, ndim=3), Ks: nd(ti.f32, ndim=3), width: ti.i32, height: ti.i32,
                near: ti.f32, far: ti.f32, splats: nd(ti.f32, ndim=3), radii: nd(ti.i32, ndim=3),
                rects: nd(ti.i32, ndim=2), pair_counts: nd(ti.i32, ndim=1)):
        # rects (C*N, 4) and pair_counts (C*N,) are laid out flat, as binning reads them
        for_items(viewmats.shape[0] * splats.shape[1], lanes, project,
                  (means, quats, scales, covars, opacities, sh, viewmats, Ks, width, height, near, far, splats,
                   radii, rects, pair_counts))

    return TorchKernel(forward)


@functools.cache
def _backward_kernel(config: ProjectionConfig, lanes: int):
    sh_degree, given_cov, antialiased, accumulate = (config.sh_degree, config.given_cov, config.antialiased,
                                                      config.accumulate)
    sh_rows_used = num_sh_bases(sh_degree) if sh_degree >= 0 else 0

    @ti.func
    def camera_grads(c, n, g, means: ti.template(), quats: ti.template(), scales: ti.template(),
                     covars: ti.template(), opacities: ti.template(), sh: ti.template(), viewmats: ti.template(),
                     Ks: ti.template(), width, height, rects: ti.template(), v_splats: ti.template(),
                     v_sh: ti.template()):
        """The gradients camera c's splat of Gaussian n (row g) sends back (zeros where it is not
        visible): (visible, mean, opacity, cov3D, scale, raw quaternion); SH gradients go into v_sh[g]
        (added with accumulate, else written)."""
        idx = c * v_splats.shape[1] + n
        visible = rects[idx, 2] > rects[idx, 0] and rects[idx, 3] > rects[idx, 1]
        v_p = ti.math.vec3(0.0)
        v_op = 0.0
        v_cov6 = ti.Vector.zero(ti.f32, 6)
        v_s = ti.math.vec3(0.0)
        v_q_raw = ti.math.vec4(0.0)
        if visible:
            Rv, tv, fx, fy, cx, cy = _camera(viewmats, Ks, c)
            p = ti.math.vec3(means[g, 0], means[g, 1], means[g, 2])
            t = Rv @ p + tv
            z = t.z
            lx0, lx1, ly0, ly1 = _frustum_limits(fx, fy, cx, cy, width, height)
            u = ti.math.clamp(t.x / z, -lx0, lx1)
            v = ti.math.clamp(t.y / z, -ly0, ly1)
            J = ti.Matrix([[fx / z, 0.0, -fx * u / z], [0.0, fy / z, -fy * v / z]])
            A = J @ Rv
            S3 = _cov3(quats, scales, covars, g, given_cov)
            cov2 = A @ S3 @ A.transpose()
            a = cov2[0, 0] + DILATION
            b = cov2[0, 1]
            d = cov2[1, 1] + DILATION
            det = a * d - b * b
            conic = ti.Matrix([[d / det, -b / det], [-b / det, a / det]])

            # conic = inverse(cov2 + 0.3 I): dL/dcov2 = -conic G conic, G the symmetric dL/dconic
            G = ti.Matrix([[v_splats[c, n, CONIC], 0.5 * v_splats[c, n, CONIC + 1]],
                           [0.5 * v_splats[c, n, CONIC + 1], v_splats[c, n, CONIC + 2]]])
            v_cov2 = -(conic @ G @ conic)
            v_op = v_splats[c, n, OPACITY]
            if ti.static(antialiased):
                det_orig = cov2[0, 0] * cov2[1, 1] - b * b
                comp = ti.sqrt(ti.max(det_orig / det, 0.0))
                if comp > 0.0:
                    # d det(X)/dX = adj(X) for symmetric 2x2 X
                    adj_orig = ti.Matrix([[cov2[1, 1], -b], [-b, cov2[0, 0]]])
                    adj_dil = ti.Matrix([[d, -b], [-b, a]])
                    v_comp = v_op * opacities[g]
                    v_cov2 += v_comp * 0.5 / comp * (adj_orig / det - det_orig / (det * det) * adj_dil)
                v_op *= comp

            # cov2 = A S3 A^T with A = J Rv
            v_S3 = A.transpose() @ v_cov2 @ A
            v_A = 2.0 * v_cov2 @ A @ S3
            v_J = v_A @ Rv.transpose()
            v_t = ti.math.vec3(0.0)
            v_t.z += (-fx * v_J[0, 0] - fy * v_J[1, 1] + fx * u * v_J[0, 2] + fy * v * v_J[1, 2]) / (z * z)
            v_u = -fx / z * v_J[0, 2]
            v_v = -fy / z * v_J[1, 2]
            if -lx0 < t.x / z < lx1:
                v_t.x += v_u / z
                v_t.z -= v_u * t.x / (z * z)
            if -ly0 < t.y / z < ly1:
                v_t.y += v_v / z
                v_t.z -= v_v * t.y / (z * z)
            # mean2d = f * t.xy / z + c, and depth = z
            gx, gy = v_splats[c, n, MEAN], v_splats[c, n, MEAN + 1]
            v_t += ti.math.vec3(fx * gx / z, fy * gy / z, -(fx * gx * t.x + fy * gy * t.y) / (z * z))
            v_t.z += v_splats[c, n, DEPTH]
            v_p = Rv.transpose() @ v_t
            if ti.static(sh_degree >= 0):
                v_color = ti.math.vec3([v_splats[c, n, RGB + ch] for ch in ti.static(range(3))])
                v_p += sh_to_rgb_backward(sh, v_sh, g, p + Rv.transpose() @ tv, v_color, sh_degree,
                                          accumulate)

            if ti.static(given_cov):
                v_cov6 = ti.Vector([v_S3[0, 0], v_S3[0, 1] + v_S3[1, 0], v_S3[0, 2] + v_S3[2, 0],
                                    v_S3[1, 1], v_S3[1, 2] + v_S3[2, 1], v_S3[2, 2]])
            else:
                M, R, s, q, q_raw = _scale_rotation(quats, scales, g)
                v_M = (v_S3 + v_S3.transpose()) @ M
                v_R = ti.Matrix([[v_M[i, j] * s[j] for j in ti.static(range(3))] for i in ti.static(range(3))])
                for j in ti.static(range(3)):
                    v_s[j] = v_M[0, j] * R[0, j] + v_M[1, j] * R[1, j] + v_M[2, j] * R[2, j]
                v_q = _rotation_backward(q, v_R)
                v_q_raw = (v_q - q * q.dot(v_q)) / q_raw.norm()

        return visible, v_p, v_op, v_cov6, v_s, v_q_raw

    @ti.func
    def unproject(g, means: ti.template(), quats: ti.template(), scales: ti.template(), covars: ti.template(),
                  opacities: ti.template(), sh: ti.template(), viewmats: ti.template(), Ks: ti.template(), width,
                  height, rects: ti.template(), v_splats: ti.template(), v_means: ti.template(),
                  v_quats: ti.template(), v_scales: ti.template(), v_covars: ti.template(),
                  v_opacities: ti.template(), v_sh: ti.template()):
        """Every gradient element of the Gaussian in row g, written once: the sum over its scene's
        cameras, taken in this thread (no zero-filled arrays, no atomics across threads, the same sum
        on every run)."""
        N = v_splats.shape[1]
        C = _cameras_per_scene(N, means.shape[0], viewmats.shape[0])
        n, first = g % N, g // N * C
        v_p = ti.math.vec3(0.0)
        v_op = 0.0
        v_cov6 = ti.Vector.zero(ti.f32, 6)
        v_s = ti.math.vec3(0.0)
        v_q_raw = ti.math.vec4(0.0)
        if ti.static(accumulate and sh_degree >= 0):
            for k in range(v_sh.shape[1]):
                for ch in ti.static(range(3)):
                    v_sh[g, k, ch] = 0.0
        for c in range(first, first + C):
            visible, p_c, op_c, cov6_c, s_c, q_c = camera_grads(
                c, n, g, means, quats, scales, covars, opacities, sh, viewmats, Ks, width, height, rects, v_splats,
                v_sh)
            if ti.static(not accumulate and sh_degree >= 0):  # one camera: SH rows it did not write
                for k in range(ti.select(visible, sh_rows_used, 0), v_sh.shape[1]):
                    for ch in ti.static(range(3)):
                        v_sh[g, k, ch] = 0.0
            v_p += p_c
            v_op += op_c
            v_cov6 += cov6_c
            v_s += s_c
            v_q_raw += q_c
        v_opacities[g] = v_op
        for k in ti.static(range(3)):
            v_means[g, k] = v_p[k]
        if ti.static(given_cov):
            for k in ti.static(range(6)):
                v_covars[g, k] = v_cov6[k]
        else:
            for k in ti.static(range(3)):
                v_scales[g, k] = v_s[k]
            for k in ti.static(range(4)):
                v_quats[g, k] = v_q_raw[k]

    @ti.kernel
    def backward(means: nd(ti.f32, ndim=2), quats: nd(ti.f32, ndim=2), scales: nd(ti.f32, ndim=2),
                 covars: nd(ti.f32, ndim=2), opacities: nd(ti.f32, ndim=1), sh: nd(ti.f32, ndim=3),
                 viewmats: nd(ti.f32, ndim=3), Ks: nd(ti.f32, ndim=3), width: ti.i32, height: ti.i32,
                 rects: nd(ti.i32, ndim=2), v_splats: nd(ti.f32, ndim=3), v_means: nd(ti.f32, ndim=2),
                 v_quats: nd(ti.f32, ndim=2), v_scales: nd(ti.f32, ndim=2), v_covars: nd(ti.f32, ndim=2),
                 v_opacities: nd(ti.f32, ndim=1), v_sh: nd(ti.f32, ndim=3)):
        for_items(means.shape[0], lanes, unproject,
                  (means, quats, scales, covars, opacities, sh, viewmats, Ks, width, height, rects, v_splats,
                   v_means, v_quats, v_scales, v_covars, v_opacities, v_sh))

    return TorchKernel(backward)
