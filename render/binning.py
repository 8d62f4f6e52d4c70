"""Tile binning shared by every splatting renderer (3D Gaussians, 2D surfels, transient).

Input is screen-space only: for each item (a splat seen by one image) a tile rectangle and a depth.
Output is the list of (tile, item) pairs sorted by tile then depth, and each tile's range in it:

    rects (I, 4) int32 [tx0, ty0, tx1, ty1), depths (I,) float32, image of each item
      -> stable depth order of the items -> pair counts in that order -> prefix sum
      -> pairs emitted front to back, keyed by image tile (int16, or int32 for many tiles)
      -> stable torch sort of the keys (CUB radix sort on CUDA) -> per-tile [start, end) ranges

Items are laid out image-major: item i belongs to image i // items_per_image, so a batch of C
cameras over N Gaussians is simply I = C * N items.
"""

import functools
from dataclasses import dataclass
from typing import Optional

import taichi as ti
import torch

from taichi_mpm.launch import TorchKernel
from taichi_mpm.runtime import ensure_init

from .lanes import for_items, item_lanes

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
    tile_ranges: (C, tiles_y, tiles_x, 2) int32 [start, end) into item_ids for every tile
        (bin_unchecked(walked=True): (C, tiles_y, tiles_x, 3), a third column for the blend kernels).
    """

    item_ids: torch.Tensor
    tile_ranges: torch.Tensor
    num_pairs: int


@functools.cache
def _emit_keys_kernel(key_dtype, by_depth: bool, lanes: int):
    """emit_keys([depth_order,] rects, offsets, items_per_image, tiles_x, num_tiles, keys out, values out):
    the pairs of the item of each rank at offsets[rank] - its count. by_depth: the item of rank r is
    depth_order[r]; otherwise r itself (index order: no order array to pass). lanes: the loop's form
    (render/lanes.py)."""

    @ti.func
    def emit(rank, depth_order: ti.template(), rects: ti.template(), offsets: ti.template(), items_per_image,
             tiles_x, num_tiles, keys: ti.template(), values: ti.template()):
        i = rank
        if ti.static(by_depth):
            i = ti.cast(depth_order[rank], ti.i32)
        tx0, ty0, tx1, ty1 = rects[i, 0], rects[i, 1], rects[i, 2], rects[i, 3]
        if tx1 > tx0 and ty1 > ty0:
            image_tile0 = (i // items_per_image) * num_tiles
            pos = offsets[rank] - (tx1 - tx0) * (ty1 - ty0)
            for ty in range(ty0, ty1):
                for tx in range(tx0, tx1):
                    keys[pos] = ti.cast(image_tile0 + ty * tiles_x + tx, key_dtype)
                    values[pos] = i
                    pos += 1

    @ti.func
    def emit_all(depth_order: ti.template(), rects: ti.template(), offsets: ti.template(), items_per_image,
                 tiles_x, num_tiles, keys: ti.template(), values: ti.template()):
        for_items(rects.shape[0], lanes, emit, (depth_order, rects, offsets, items_per_image, tiles_x, num_tiles,
                  keys, values))

    if by_depth:
        @ti.kernel
        def emit_keys(depth_order: ti.types.ndarray(ti.i64, ndim=1), rects: ti.types.ndarray(ti.i32, ndim=2),
                      offsets: ti.types.ndarray(ti.i64, ndim=1), items_per_image: ti.i32, tiles_x: ti.i32,
                      num_tiles: ti.i32, keys: ti.types.ndarray(key_dtype, ndim=1),
                      values: ti.types.ndarray(ti.i32, ndim=1)):
            emit_all(depth_order, rects, offsets, items_per_image, tiles_x, num_tiles, keys, values)
    else:
        @ti.kernel
        def emit_keys(rects: ti.types.ndarray(ti.i32, ndim=2), offsets: ti.types.ndarray(ti.i64, ndim=1),
                      items_per_image: ti.i32, tiles_x: ti.i32, num_tiles: ti.i32,
                      keys: ti.types.ndarray(key_dtype, ndim=1), values: ti.types.ndarray(ti.i32, ndim=1)):
            emit_all(rects, rects, offsets, items_per_image, tiles_x, num_tiles, keys, values)  # no order array

    return TorchKernel(emit_keys)


@functools.cache
def tile_grid(width: int, height: int) -> TileGrid:
    """TileGrid(width, height), built once per size (the renderers look it up on every call)."""
    return TileGrid(width, height)


@functools.cache
def _tile_bounds(num_images: int, tiles_y: int, tiles_x: int, walked: bool, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    """(num_images, tiles_y, tiles_x, 2) rows (t, t + 1) for image tile t: the keys at which its run of
    pairs starts and the next one's starts, so that one searchsorted gives every tile's [start, end)
    already in the tile_ranges layout. walked adds a third column t: the start again (see bin_unchecked)."""
    starts = torch.arange(num_images * tiles_y * tiles_x, dtype=dtype, device=device)
    columns = (starts, starts + 1, starts) if walked else (starts, starts + 1)
    return torch.stack(columns, -1).view(num_images, tiles_y, tiles_x, len(columns))


def _check_items(rects: torch.Tensor, depths: torch.Tensor, num_images: int, grid: TileGrid, max_pairs: int) -> None:
    if rects.dim() != 2 or rects.shape[1] != 4 or rects.dtype != torch.int32:
        raise ValueError(f"rects must be (I, 4) int32, got {tuple(rects.shape)} {rects.dtype}")
    if depths is not None and (depths.shape != rects.shape[:1] or depths.dtype != torch.float32):
        raise ValueError(f"depths must be ({rects.shape[0]},) float32, got {tuple(depths.shape)} {depths.dtype}")
    if not 0 < max_pairs < 2**31:
        raise ValueError(f"max_pairs must be in [1, 2**31) (pair indices are int32), got {max_pairs}")
    if num_images <= 0 or rects.shape[0] % num_images:
        raise ValueError(f"{rects.shape[0]} items cannot be split into {num_images} images")
    if num_images * grid.num_tiles >= 2**31:
        raise ValueError(f"{num_images} images of {grid.num_tiles} tiles overflow the int32 tile keys")


def bin_rects(rects: torch.Tensor, depths: torch.Tensor, num_images: int, grid: TileGrid,
              max_pairs: int = DEFAULT_MAX_PAIRS) -> Binning:
    """Sort (tile, item) pairs by tile then depth.

    Args:
        rects: (I, 4) int32 tile rectangles [tx0, ty0, tx1, ty1), already clipped to the grid;
            empty rectangles (tx1 <= tx0 or ty1 <= ty0) make no pairs.
        depths: (I,) float32 sort keys within a tile (front to back = ascending; ties keep item order),
            or None to keep item order.
        num_images: I must be a multiple of it; item i belongs to image i // (I / num_images).
        grid: the tile grid of every image.
        max_pairs: cap on the pair count; above it TooManyPairsError is raised before allocating.
    """
    _check_items(rects, depths, num_images, grid, max_pairs)
    counts = (rects[:, 2:] - rects[:, :2]).clamp_min(0).prod(1)
    return bin_counted_rects(rects, depths, counts, num_images, grid, max_pairs)


def bin_counted_rects(rects: torch.Tensor, depths: Optional[torch.Tensor], counts: torch.Tensor, num_images: int,
                      grid: TileGrid, max_pairs: int = DEFAULT_MAX_PAIRS) -> Binning:
    """bin_rects when the pair count of every item, (I,) integer (rectangle area, 0 if empty), is
    already known (the projection kernel writes it), which saves the torch ops that compute it.
    depths=None keeps the items' own order within a tile (2D splats: index order) and skips the
    depth sort.

    Two sorts give the (tile, depth, item) order: a stable sort of the I depths, then pairs emitted
    in that depth order and stably sorted by their image-tile key alone, 16 (or 32) bits instead of
    a 64-bit (tile, depth) key: 2 (or 4) radix passes over the pairs instead of 8.
    """
    _check_items(rects, depths, num_images, grid, max_pairs)
    rects = rects.contiguous()
    if counts.shape != rects.shape[:1] or counts.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"counts must be ({rects.shape[0]},) int32 or int64, got {tuple(counts.shape)} {counts.dtype}")
    return bin_unchecked(rects, depths, counts, num_images, grid, max_pairs)


def bin_unchecked(rects: torch.Tensor, depths: Optional[torch.Tensor], counts: torch.Tensor, num_images: int,
                  grid: TileGrid, max_pairs: int, walked: bool = False) -> Binning:
    """bin_counted_rects without the argument checks, for callers whose kernels wrote rects, depths and
    counts (contiguous, int32 rects, float32 depths) and that checked max_pairs themselves.

    walked=True gives tile_ranges a third column holding each tile's start: the blend forward raises it
    (atomic max) to the end of the pairs any pixel of the tile used, which its backward walks back
    from, so that this needs no zero-filled array of its own.
    """
    device = rects.device
    num_image_tiles = num_images * grid.num_tiles

    def no_pairs():
        ranges = torch.zeros(num_images, grid.tiles_y, grid.tiles_x, 3 if walked else 2, dtype=torch.int32,
                             device=device)
        return Binning(torch.zeros(0, dtype=torch.int32, device=device), ranges, 0)

    if rects.shape[0] == 0:
        return no_pairs()
    if depths is None:
        offsets = torch.cumsum(counts, 0)
    else:
        depth_order = torch.sort(depths, stable=True).indices
        offsets = torch.cumsum(torch.index_select(counts, 0, depth_order), 0)
    num_pairs = int(offsets[-1])
    if num_pairs > max_pairs:
        raise TooManyPairsError(
            f"{num_pairs} tile/splat pairs exceed max_pairs={max_pairs} (the largest splat covers "
            f"{int(counts.max())} tiles); shrink or cull the huge splats, or pass a larger max_pairs")
    if num_pairs == 0:
        return no_pairs()
    ensure_init()
    key_dtype, torch_key_dtype = (ti.i16, torch.int16) if num_image_tiles < 2**15 else (ti.i32, torch.int32)
    keys = torch.empty(num_pairs, dtype=torch_key_dtype, device=device)
    values = torch.empty(num_pairs, dtype=torch.int32, device=device)
    emit = _emit_keys_kernel(key_dtype, depths is not None, item_lanes())
    layout = (rects.shape[0] // num_images, grid.tiles_x, grid.num_tiles, keys, values)
    if depths is None:
        emit(rects, offsets, *layout)
    else:
        emit(depth_order, rects, offsets, *layout)
    keys, pair_order = torch.sort(keys, stable=True)  # stable: pairs of a tile stay in depth order
    item_ids = torch.index_select(values, 0, pair_order)
    bounds = _tile_bounds(num_images, grid.tiles_y, grid.tiles_x, walked, torch_key_dtype, device)
    return Binning(item_ids, torch.searchsorted(keys, bounds, out_int32=True), num_pairs)
