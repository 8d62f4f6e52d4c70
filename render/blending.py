"""Alpha blending of sorted splats per 16x16 tile, forward and hand-written backward.

Rules shared with the float64 reference (render/reference.py): for the splats of a pixel in
front-to-back order, alpha = min(0.99, opacity * exp(power)) with power = -0.5 d^T conic d and
d = mean2D - pixel centre; splats with power > 0 or alpha < 1/255 are skipped; blending stops before a
splat that would bring the transmittance T below 1e-4. The forward writes each pixel's alpha 1 - T
(C, H, W, 1), the layout callers return, and keeps the final T itself and the number of pairs of the
tile's range it walked through up to the last one blended; the backward walks back from there,
dividing T by (1 - alpha). The tile ranges carry a third column (render.binning's walked=True), the
tile's start, which the forward raises by atomic max to the end of the pairs any pixel of the tile
used: the CUDA backward's bound, with no zero-filled array to allocate.

Two kernels per direction: on CUDA one 256-thread block per tile loads batches of splats into shared
memory and the backward sums each splat's gradients over the warp with shuffles before one global
atomic a gradient (reduce_scatter below); on CPU (where Taichi has no shared memory or warps) each
pixel walks its tile's range on its own. Both call the same per-splat functions below.

Two blend modes (BlendConfig.mode), compiled in statically so neither pays for the other:
"alpha" is the front-to-back compositing above; "sum" is GaussianImage's order-free accumulated sum
colour = sum_i alpha_i c_i (no transmittance, no early stop; the same alpha rule and 1/255 cut),
whose second output is 1 - sum_i alpha_i so that the returned "alpha" is the summed weight.
"""

import functools
from dataclasses import dataclass

import taichi as ti

from taichi_mpm.launch import TorchKernel

from .binning import TILE_SIZE as TILE
from .projection import ALPHA_MIN
from .splat_record import CONIC, GEOMETRY, MEAN, OPACITY

ALPHA_MAX = 0.99
T_MIN = 1e-4
BLOCK = TILE * TILE
FULL_MASK = 0xFFFFFFFF

nd = ti.types.ndarray


@ti.func
def _splat_alpha(mean, conic, opacity, pixel):
    """alpha, opacity*gaussian (before the clamp) and d = mean - pixel for one splat at one pixel."""
    d = mean - pixel
    power = -0.5 * (conic[0] * d.x * d.x + conic[2] * d.y * d.y) - conic[1] * d.x * d.y
    raw = 0.0
    if power <= 0.0:
        raw = opacity * ti.exp(power)
    return ti.min(ALPHA_MAX, raw), raw, d


@ti.func
def _splat_grads(alpha, raw, d, conic, opacity, v_alpha):
    """dL/d(mean2D, conic, opacity) of one splat at one pixel from dL/dalpha."""
    v_mean = ti.math.vec2(0.0)
    v_conic = ti.math.vec3(0.0)
    v_opacity = 0.0
    if raw <= ALPHA_MAX:  # clamped alphas do not depend on the splat
        v_opacity = raw / opacity * v_alpha
        v_power = alpha * v_alpha
        v_mean = -v_power * ti.math.vec2(conic[0] * d.x + conic[1] * d.y, conic[2] * d.y + conic[1] * d.x)
        v_conic = -v_power * ti.math.vec3(0.5 * d.x * d.x, d.x * d.y, 0.5 * d.y * d.y)
    return v_mean, v_conic, v_opacity


@ti.func
def _pixel_of(tile_index, lane, tiles_x, num_tiles):
    image = tile_index // num_tiles
    local = tile_index % num_tiles
    px = (local % tiles_x) * TILE + lane % TILE
    py = (local // tiles_x) * TILE + lane // TILE
    return image, px, py


BLEND_MODES = ("alpha", "sum")
# The backward accumulates every splat's gradients into one array of the record's layout
# (render/splat_record.py), its atomics indexed by the value's slot with no branch (blend backward,
# 100k Gaussians on 8 HD cameras, H200: four arrays picked by slot 6.23 ms, one array 5.31 ms;
# items indexed flat, with no c, n = item // N, item % N, 4.43 ms; bench/raster_kernel_time.py,
# 2026-11-28).


def split_record(record, first_feature: int, channels: int):
    """(means2d (..., 2), conics (..., 3), opacities (...), features (..., K)): views of a record array
    (..., width) (render/splat_record.py), e.g. the blend backward's gradients."""
    return (record[..., MEAN:MEAN + 2], record[..., CONIC:CONIC + 3], record[..., OPACITY],
            record[..., first_feature:first_feature + channels])


# bits of the backward's `given` argument: which of v_image, v_alpha the loss produced; the kernel
# reads only those, so a missing one is passed as a placeholder instead of zero-filled
GIVEN_IMAGE, GIVEN_ALPHA = 1, 2


@dataclass(frozen=True)
class BlendConfig:
    """What a pair of blend kernels is compiled for.

    variant: "block" (CUDA only: shared memory, warp reductions) or "pixel" (any arch).
    channels: features per splat, in the record's columns first_feature .. first_feature + channels - 1
    (render/splat_record.py). mode: "alpha" (front-to-back compositing) or "sum" (order-free).
    """

    variant: str
    channels: int
    mode: str = "alpha"
    first_feature: int = GEOMETRY

    def __post_init__(self):
        if self.variant not in ("block", "pixel"):
            raise ValueError(f"variant must be 'block' or 'pixel', got {self.variant!r}")
        if self.mode not in BLEND_MODES:
            raise ValueError(f"blend mode must be one of {BLEND_MODES}, got {self.mode!r}")
        if not (isinstance(self.channels, int) and self.channels >= 1):
            raise ValueError(f"channels must be a positive int, got {self.channels!r}")
        if not (isinstance(self.first_feature, int) and self.first_feature >= GEOMETRY):
            raise ValueError(f"features start at column {GEOMETRY} or later, got {self.first_feature!r}")


@functools.cache  # a per-call lookup on plain arguments (no BlendConfig built and hashed each call)
def blend_kernels(variant: str, channels: int, mode: str = "alpha", first_feature: int = GEOMETRY):
    """(forward, backward) kernels blending `channels` features per splat; see BlendConfig.

    forward(splats (C*N, width) records (render/splat_record.py), item_ids (P,),
            tile_ranges (C, ty, tx, 3) [start, end, start: raised to the end walked], width, height,
            image (C, H, W, K) out, alpha (C, H, W, 1) out, final_T (C, H, W) out, last (C, H, W) int32 out)
    backward(splats, item_ids, tile_ranges (as the forward left them), width, height, final_T, last,
             v_image (C, H, W, K), v_alpha (C, H, W, 1), given (GIVEN_* bits),
             v_splats (C*N, width) zeroed, accumulated into in the records' layout; split_record names it)
    Records are indexed by the item ids binning emits (c * N + n), with no division.
    """
    return _blend_kernels(BlendConfig(variant, channels, mode, first_feature))


@functools.cache
def _blend_kernels(config: BlendConfig):
    variant, K, alpha_mode, F = config.variant, config.channels, config.mode == "alpha", config.first_feature

    @ti.func
    def out_alpha_weight(v_out_alpha, T_final):
        """What uncomposite needs of dL/d(output alpha): times the final T in alpha mode (one value
        held through the walk back instead of two)."""
        weight = v_out_alpha
        if ti.static(alpha_mode):
            weight = v_out_alpha * T_final
        return weight

    @ti.func
    def uncomposite(alpha, T, feat, behind, v_pix, v_out):
        """Backward of one blended splat, walking back to front: (T in front of it, dL/dalpha,
        dL/dfeature, blended features behind the splat in front of it). v_out: out_alpha_weight."""
        v_alpha = feat.dot(v_pix) + v_out
        v_feat = alpha * v_pix
        if ti.static(alpha_mode):
            ra = 1.0 / (1.0 - alpha)
            T = T * ra
            v_alpha = T * (feat - behind).dot(v_pix) + v_out * ra
            behind = alpha * feat + (1.0 - alpha) * behind
            v_feat = v_feat * T
        return T, v_alpha, v_feat, behind

    @ti.func
    def load(splats: ti.template(), item):
        mean = ti.math.vec2(splats[item, MEAN], splats[item, MEAN + 1])
        conic = ti.math.vec3(splats[item, CONIC], splats[item, CONIC + 1], splats[item, CONIC + 2])
        feat = ti.Vector([splats[item, F + k] for k in ti.static(range(K))], ti.f32)
        return mean, conic, splats[item, OPACITY], feat

    if variant == "pixel":
        @ti.kernel
        def forward(splats: nd(ti.f32, ndim=2), item_ids: nd(ti.i32, ndim=1), ranges: nd(ti.i32, ndim=4),
                    width: ti.i32, height: ti.i32,
                    image: nd(ti.f32, ndim=4), alpha_out: nd(ti.f32, ndim=4), final_T: nd(ti.f32, ndim=3),
                    last: nd(ti.i32, ndim=3)):
            for c, py, px in ti.ndrange(image.shape[0], height, width):
                ty, tx = py // TILE, px // TILE
                start, end = ranges[c, ty, tx, 0], ranges[c, ty, tx, 1]
                pixel = ti.math.vec2(px + 0.5, py + 0.5)
                T = 1.0
                acc = ti.Vector.zero(ti.f32, K)
                n_walked = 0
                for j in range(start, end):
                    mean, conic, opacity, feat = load(splats, item_ids[j])
                    alpha, _, _ = _splat_alpha(mean, conic, opacity, pixel)
                    if alpha >= ALPHA_MIN:
                        if ti.static(alpha_mode):
                            next_T = T * (1.0 - alpha)
                            if next_T < T_MIN:
                                break
                            acc += alpha * T * feat
                            T = next_T
                        else:  # sum: T tracks 1 - (sum of weights), nothing stops the walk
                            acc += alpha * feat
                            T -= alpha
                        n_walked = j - start + 1
                for k in ti.static(range(K)):
                    image[c, py, px, k] = acc[k]
                alpha_out[c, py, px, 0] = 1.0 - T
                final_T[c, py, px] = T
                last[c, py, px] = n_walked
                ti.atomic_max(ranges[c, ty, tx, 2], start + n_walked)

        @ti.kernel
        def backward(splats: nd(ti.f32, ndim=2), item_ids: nd(ti.i32, ndim=1), ranges: nd(ti.i32, ndim=4),
                     width: ti.i32, height: ti.i32, final_T: nd(ti.f32, ndim=3), last: nd(ti.i32, ndim=3),
                     v_image: nd(ti.f32, ndim=4), v_alpha_out: nd(ti.f32, ndim=4), given: ti.i32,
                     v_splats: nd(ti.f32, ndim=2)):
            for c, py, px in ti.ndrange(v_image.shape[0], height, width):
                start = ranges[c, py // TILE, px // TILE, 0]
                pixel = ti.math.vec2(px + 0.5, py + 0.5)
                T_final = final_T[c, py, px]
                T = T_final
                v_pix = ti.Vector.zero(ti.f32, K)
                if given & GIVEN_IMAGE:
                    v_pix = ti.Vector([v_image[c, py, px, k] for k in ti.static(range(K))], ti.f32)
                v_out_alpha = 0.0
                if given & GIVEN_ALPHA:
                    v_out_alpha = v_alpha_out[c, py, px, 0]
                v_out = out_alpha_weight(v_out_alpha, T_final)
                behind = ti.Vector.zero(ti.f32, K)  # blended features behind the current splat, per unit T
                for back in range(last[c, py, px]):
                    j = start + last[c, py, px] - 1 - back
                    item = item_ids[j]
                    mean, conic, opacity, feat = load(splats, item)
                    alpha, raw, d = _splat_alpha(mean, conic, opacity, pixel)
                    if alpha >= ALPHA_MIN:
                        T, v_alpha, v_feat, behind = uncomposite(alpha, T, feat, behind, v_pix, v_out)
                        v_mean, v_conic, v_opacity = _splat_grads(alpha, raw, d, conic, opacity, v_alpha)
                        v_splats[item, MEAN] += v_mean.x
                        v_splats[item, MEAN + 1] += v_mean.y
                        for k in ti.static(range(3)):
                            v_splats[item, CONIC + k] += v_conic[k]
                        v_splats[item, OPACITY] += v_opacity
                        for k in ti.static(range(K)):
                            v_splats[item, F + k] += v_feat[k]

        return TorchKernel(forward), TorchKernel(backward)

    # The CUDA backward sums a splat's V gradients (mean 2, conic 3, opacity 1, features K) over a
    # warp by recursive halving: at each xor-shuffle step a lane keeps half of its live values and
    # sends the other half to its partner, so each lane ends with the warp's total of at most one of
    # them (HELD > 1 past 26 channels, where V > 32). That is ceil(V/2) + ... shuffles (12 for V = 9 or
    # 10) where a butterfly per value takes 5 V (45), and V lanes issue the global atomics at once where
    # lane 0 issued all V in turn. (ncu, 100k Gaussians, 8 HD cameras, H100, 2026-11-28: the backward
    # executed 3.7x the forward's instructions; by the code, the butterflies were about half a splat's.)
    V = GEOMETRY + K
    halving = []  # per step: (xor offset, live values before it, values kept after it), fixed at compile time
    HELD = V
    for offset in (16, 8, 4, 2, 1):
        halving.append((offset, HELD, (HELD + 1) // 2))
        HELD = (HELD + 1) // 2

    @ti.func
    def scatter_slots(lane):
        """(first, count): warp lane `lane` ends reduce_scatter with the totals of values first ..
        first + count - 1 in its entries 0 .. count - 1 (count <= HELD; 0 for most lanes when V < 32)."""
        first, count = 0, V  # count: values of the lane's current share that are not padding
        for step in ti.static(halving):
            if lane & step[0]:
                first += step[2]
                count = ti.max(0, count - step[2])
            else:
                count = ti.min(count, step[2])
        return first, count

    @ti.func
    def reduce_scatter(values, lane):
        """values: V floats a lane; every lane of the warp must call it. See scatter_slots."""
        v = values
        for step in ti.static(halving):  # step: (offset, live, keep)
            upper = lane & step[0]
            for i in ti.static(range(step[2])):
                hi = 0.0
                if ti.static(step[2] + i < step[1]):
                    hi = v[step[2] + i]
                send = ti.select(upper, v[i], hi)
                got = ti.simt.warp.shfl_xor_i32(ti.u32(FULL_MASK), ti.bit_cast(send, ti.i32), step[0])
                v[i] = ti.select(upper, hi, v[i]) + ti.bit_cast(got, ti.f32)
        return v

    @ti.kernel
    def forward_cuda(splats: nd(ti.f32, ndim=2), item_ids: nd(ti.i32, ndim=1), ranges: nd(ti.i32, ndim=4),
                     width: ti.i32, height: ti.i32,
                     image: nd(ti.f32, ndim=4), alpha_out: nd(ti.f32, ndim=4), final_T: nd(ti.f32, ndim=3),
                     last: nd(ti.i32, ndim=3)):
        tiles_y, tiles_x = ranges.shape[1], ranges.shape[2]
        num_tiles = tiles_x * tiles_y
        ti.loop_config(block_dim=BLOCK)
        for thread in range(ranges.shape[0] * num_tiles * BLOCK):
            lane = thread % BLOCK
            c, px, py = _pixel_of(thread // BLOCK, lane, tiles_x, num_tiles)
            ty, tx = py // TILE, px // TILE
            start, end = ranges[c, ty, tx, 0], ranges[c, ty, tx, 1]
            s_geom = ti.simt.block.SharedArray((BLOCK, 6), ti.f32)
            s_feat = ti.simt.block.SharedArray((BLOCK, K), ti.f32)
            pixel = ti.math.vec2(px + 0.5, py + 0.5)
            inside = px < width and py < height
            done = not inside
            T = 1.0
            acc = ti.Vector.zero(ti.f32, K)
            n_walked = 0
            for batch in range((end - start + BLOCK - 1) // BLOCK):
                if ti.simt.block.sync_all_nonzero(ti.cast(done, ti.i32)):
                    break  # every pixel of the tile is saturated
                j = start + batch * BLOCK + lane
                if j < end:
                    mean, conic, opacity, feat = load(splats, item_ids[j])
                    s_geom[lane, 0], s_geom[lane, 1] = mean.x, mean.y
                    s_geom[lane, 2], s_geom[lane, 3], s_geom[lane, 4] = conic.x, conic.y, conic.z
                    s_geom[lane, 5] = opacity
                    for k in ti.static(range(K)):
                        s_feat[lane, k] = feat[k]
                ti.simt.block.sync()
                for s in range(ti.min(BLOCK, end - start - batch * BLOCK)):
                    if done:
                        break  # a warp whose pixels are all saturated skips the rest of the batch
                    mean = ti.math.vec2(s_geom[s, 0], s_geom[s, 1])
                    conic = ti.math.vec3(s_geom[s, 2], s_geom[s, 3], s_geom[s, 4])
                    alpha, _, _ = _splat_alpha(mean, conic, s_geom[s, 5], pixel)
                    if alpha >= ALPHA_MIN:
                        if ti.static(alpha_mode):
                            next_T = T * (1.0 - alpha)
                            if next_T < T_MIN:
                                done = True
                            else:
                                for k in ti.static(range(K)):
                                    acc[k] += alpha * T * s_feat[s, k]
                                T = next_T
                                n_walked = batch * BLOCK + s + 1
                        else:  # sum: T tracks 1 - (sum of weights), nothing stops the walk
                            for k in ti.static(range(K)):
                                acc[k] += alpha * s_feat[s, k]
                            T -= alpha
                            n_walked = batch * BLOCK + s + 1
            if inside:
                for k in ti.static(range(K)):
                    image[c, py, px, k] = acc[k]
                alpha_out[c, py, px, 0] = 1.0 - T
                final_T[c, py, px] = T
                last[c, py, px] = n_walked
            for offset in ti.static((16, 8, 4, 2, 1)):
                n_walked = ti.max(n_walked, ti.simt.warp.shfl_down_i32(ti.u32(FULL_MASK), n_walked, offset))
            if lane % 32 == 0:
                ti.atomic_max(ranges[c, ty, tx, 2], start + n_walked)

    @ti.kernel
    def backward_cuda(splats: nd(ti.f32, ndim=2), item_ids: nd(ti.i32, ndim=1), ranges: nd(ti.i32, ndim=4),
                      width: ti.i32, height: ti.i32, final_T: nd(ti.f32, ndim=3), last: nd(ti.i32, ndim=3),
                      v_image: nd(ti.f32, ndim=4), v_alpha_out: nd(ti.f32, ndim=4), given: ti.i32,
                      v_splats: nd(ti.f32, ndim=2)):
        tiles_y, tiles_x = ranges.shape[1], ranges.shape[2]
        num_tiles = tiles_x * tiles_y
        ti.loop_config(block_dim=BLOCK)
        for thread in range(ranges.shape[0] * num_tiles * BLOCK):
            lane = thread % BLOCK
            c, px, py = _pixel_of(thread // BLOCK, lane, tiles_x, num_tiles)
            ty, tx = py // TILE, px // TILE
            start = ranges[c, ty, tx, 0]
            s_geom = ti.simt.block.SharedArray((BLOCK, 6), ti.f32)
            s_feat = ti.simt.block.SharedArray((BLOCK, K), ti.f32)
            s_item = ti.simt.block.SharedArray((BLOCK,), ti.i32)
            pixel = ti.math.vec2(px + 0.5, py + 0.5)
            inside = px < width and py < height
            n_walked = 0
            T_final = 1.0
            v_pix = ti.Vector.zero(ti.f32, K)
            v_out_alpha = 0.0
            if inside:
                n_walked = last[c, py, px]
                T_final = final_T[c, py, px]
                if given & GIVEN_ALPHA:
                    v_out_alpha = v_alpha_out[c, py, px, 0]
                if given & GIVEN_IMAGE:
                    for k in ti.static(range(K)):
                        v_pix[k] = v_image[c, py, px, k]
            T = T_final
            v_out = out_alpha_weight(v_out_alpha, T_final)
            behind = ti.Vector.zero(ti.f32, K)
            end = ranges[c, ty, tx, 2]  # the furthest any pixel of the tile got (the forward's atomic max)
            for batch in range((end - start + BLOCK - 1) // BLOCK):
                ti.simt.block.sync()
                j = end - 1 - batch * BLOCK - lane
                if j >= start:
                    item = item_ids[j]
                    mean, conic, opacity, feat = load(splats, item)
                    s_item[lane] = item
                    s_geom[lane, 0], s_geom[lane, 1] = mean.x, mean.y
                    s_geom[lane, 2], s_geom[lane, 3], s_geom[lane, 4] = conic.x, conic.y, conic.z
                    s_geom[lane, 5] = opacity
                    for k in ti.static(range(K)):
                        s_feat[lane, k] = feat[k]
                ti.simt.block.sync()
                for s in range(ti.min(BLOCK, end - start - batch * BLOCK)):
                    pos = end - 1 - batch * BLOCK - s - start  # index of this splat in the tile's range
                    v_mean = ti.math.vec2(0.0)
                    v_conic = ti.math.vec3(0.0)
                    v_opacity = 0.0
                    v_feat = ti.Vector.zero(ti.f32, K)
                    contributes = 0
                    if pos < n_walked:
                        mean = ti.math.vec2(s_geom[s, 0], s_geom[s, 1])
                        conic = ti.math.vec3(s_geom[s, 2], s_geom[s, 3], s_geom[s, 4])
                        opacity = s_geom[s, 5]
                        alpha, raw, d = _splat_alpha(mean, conic, opacity, pixel)
                        if alpha >= ALPHA_MIN:
                            contributes = 1
                            feat = ti.Vector([s_feat[s, k] for k in ti.static(range(K))], ti.f32)
                            T, v_alpha, v_feat, behind = uncomposite(alpha, T, feat, behind, v_pix, v_out)
                            v_mean, v_conic, v_opacity = _splat_grads(alpha, raw, d, conic, opacity, v_alpha)
                    if ti.simt.warp.any_nonzero(ti.u32(FULL_MASK), contributes):
                        grads = ti.Vector.zero(ti.f32, V)
                        grads[MEAN], grads[MEAN + 1] = v_mean.x, v_mean.y
                        for k in ti.static(range(3)):
                            grads[CONIC + k] = v_conic[k]
                        grads[OPACITY] = v_opacity
                        for k in ti.static(range(K)):
                            grads[GEOMETRY + k] = v_feat[k]
                        totals = reduce_scatter(grads, lane % 32)
                        # here, not before the walk: two integers fewer held through it (registers
                        # set the blocks an SM holds)
                        first, count = scatter_slots(lane % 32)
                        if count > 0:
                            item = s_item[s]
                            for h in ti.static(range(HELD)):
                                if h < count:  # a slot's column: the features start at F
                                    slot = first + h
                                    ti.atomic_add(v_splats[item, slot + ti.select(slot >= GEOMETRY, F - GEOMETRY, 0)],
                                                  totals[h])

    return TorchKernel(forward_cuda), TorchKernel(backward_cuda)
