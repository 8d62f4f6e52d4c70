"""Tile binning shared by every splatting renderer (3D Gaussians, 2D surfels, transient).

Input is screen-space only: for each item (a splat seen by one image) a tile rectangle and a depth.
Output is the list of (tile, item) pairs sorted by tile then depth, and each tile's range in it:

    rects (I, 4) int32 [tx0, ty0, tx1, ty1), depths (I,) float32, image of each item
      -> pair counts -> prefix sum -> 64-bit keys (image tile << 32 | ordered depth bits)
      -> torch sort (CUB radix sort on CUDA) -> per-tile [start, end) ranges

Items are laid out image-major: item i belongs to image i // items_per_image, so a batch of C
cameras over N Gaussians is simply I = C * N items.
"""

import functools
from dataclasses import dataclass

import taichi as ti
import torch

from bridge.runtime import ensure_init

TILE_SIZE = 16
DEFAULT_MAX_PAIRS = 1 << 27  # binning holds ~40 bytes a pair (5 GiB here); raise it explicitly for larger scenes


class TooManyPairsError(RuntimeError):
    """The tile/splat pair count exceeds the cap (huge splats covering most tiles, or too many)."""


@dataclass(frozen=True)
class TileGrid:
    """Tiles covering a width x height image; the last row/column may stick out of the image."""

    width: int
    height: int
    tile_size: int = TILE_SIZE

    @property
    def tiles_x(self) -> int:
        return (self.width + self.tile_size - 1) // self.tile_size

    @property
    def tiles_y(self) -> int:
        return (self.height + self.tile_size - 1) // self.tile_size

    @property
    def num_tiles(self) -> int:
        return self.tiles_x * self.tiles_y


@dataclass
class Binning:
    """Sorted pairs and tile ranges.

    item_ids: (P,) int32, the item (index into the flattened (C*N) items) of each sorted pair.
    tile_ranges: (C, tiles_y, tiles_x, 2) int32 [start, end) into item_ids for every tile.
    """

    item_ids: torch.Tensor
    tile_ranges: torch.Tensor
    num_pairs: int


@functools.cache
def _emit_keys_kernel():
    @ti.kernel
    def emit_keys(rects: ti.types.ndarray(ti.i32, ndim=2), depths: ti.types.ndarray(ti.f32, ndim=1),
                  offsets: ti.types.ndarray(ti.i64, ndim=1), items_per_image: ti.i32, tiles_x: ti.i32,
                  num_tiles: ti.i32, keys: ti.types.ndarray(ti.i64, ndim=1),
                  values: ti.types.ndarray(ti.i32, ndim=1)):
        for i in range(rects.shape[0]):
            tx0, ty0, tx1, ty1 = rects[i, 0], rects[i, 1], rects[i, 2], rects[i, 3]
            if tx1 > tx0 and ty1 > ty0:
                # IEEE float bits made monotone as unsigned integers (works for negative depths too)
                bits = ti.bit_cast(depths[i], ti.i32)
                ordered = ti.select(bits < 0, ~bits, bits | ti.i32(-2147483648))
                low = ti.cast(ordered, ti.i64) & ti.i64(0xFFFFFFFF)
                image_tile0 = ti.cast(i // items_per_image, ti.i64) * num_tiles
                pos = offsets[i] - (tx1 - tx0) * (ty1 - ty0)
                for ty in range(ty0, ty1):
                    for tx in range(tx0, tx1):
                        keys[pos] = ((image_tile0 + ty * tiles_x + tx) << 32) | low
                        values[pos] = i
                        pos += 1

    return emit_keys


def bin_rects(rects: torch.Tensor, depths: torch.Tensor, num_images: int, grid: TileGrid,
              max_pairs: int = DEFAULT_MAX_PAIRS) -> Binning:
    """Sort (tile, item) pairs by tile then depth.

    Args:
        rects: (I, 4) int32 tile rectangles [tx0, ty0, tx1, ty1), already clipped to the grid;
            empty rectangles (tx1 <= tx0 or ty1 <= ty0) make no pairs.
        depths: (I,) float32 sort keys within a tile (front to back = ascending).
        num_images: I must be a multiple of it; item i belongs to image i // (I / num_images).
        grid: the tile grid of every image.
        max_pairs: cap on the pair count; above it TooManyPairsError is raised before allocating.
    """
    if rects.dim() != 2 or rects.shape[1] != 4 or rects.dtype != torch.int32:
        raise ValueError(f"rects must be (I, 4) int32, got {tuple(rects.shape)} {rects.dtype}")
    if depths.shape != rects.shape[:1] or depths.dtype != torch.float32:
        raise ValueError(f"depths must be ({rects.shape[0]},) float32, got {tuple(depths.shape)} {depths.dtype}")
    if not 0 < max_pairs < 2**31:
        raise ValueError(f"max_pairs must be in [1, 2**31) (pair indices are int32), got {max_pairs}")
    if num_images <= 0 or rects.shape[0] % num_images:
        raise ValueError(f"{rects.shape[0]} items cannot be split into {num_images} images")
    device = rects.device
    ranges = torch.zeros(num_images, grid.tiles_y, grid.tiles_x, 2, dtype=torch.int32, device=device)
    if rects.shape[0] == 0:
        return Binning(torch.zeros(0, dtype=torch.int32, device=device), ranges, 0)
    counts = ((rects[:, 2] - rects[:, 0]).clamp_min(0).to(torch.int64)
              * (rects[:, 3] - rects[:, 1]).clamp_min(0))
    offsets = torch.cumsum(counts, 0)
    num_pairs = int(offsets[-1])
    if num_pairs > max_pairs:
        raise TooManyPairsError(
            f"{num_pairs} tile/splat pairs exceed max_pairs={max_pairs} (the largest splat covers "
            f"{int(counts.max())} tiles); shrink or cull the huge splats, or pass a larger max_pairs")
    if num_pairs == 0:
        return Binning(torch.zeros(0, dtype=torch.int32, device=device), ranges, 0)
    ensure_init()
    keys = torch.empty(num_pairs, dtype=torch.int64, device=device)
    values = torch.empty(num_pairs, dtype=torch.int32, device=device)
    _emit_keys_kernel()(rects.contiguous(), depths.contiguous(), offsets, rects.shape[0] // num_images,
                        grid.tiles_x, grid.num_tiles, keys, values)
    keys, order = torch.sort(keys, stable=True)  # equal depths keep item order, like the reference
    item_ids = values[order]
    image_tiles = keys >> 32
    bounds = torch.searchsorted(image_tiles, torch.arange(num_images * grid.num_tiles + 1, device=device))
    ranges = torch.stack([bounds[:-1], bounds[1:]], 1).to(torch.int32)
    return Binning(item_ids, ranges.view(num_images, grid.tiles_y, grid.tiles_x, 2), num_pairs)
