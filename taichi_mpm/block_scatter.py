"""P2G through CUDA shared memory: the particles of one CUDA block add their 27-node stencils into a
shared-memory tile of the nodes they touch, and the block then adds each tile node to the grid once.

Why: P2G is the substep's bottleneck, four global float atomics for each of a particle's 27 nodes
(0.74 of 1.18 ms a substep at 1M particles on an H200, 2026-11-27). Particles stored in spatial
order (``MPMSolver.sort_particles``, or meshes sampled on a lattice) put a block's 128 particles in a
few cells, so the tile holds a few hundred nodes and the grid sees one atomic per node and channel
instead of one per particle and node. A block whose particles spread wider than the tile
(``TILE_NODES``) scatters straight to the grid as the plain kernel does: any order stays correct,
only slower.

Use inside a range-for over ``blocked(n)`` indices under ``ti.loop_config(block_dim=BLOCK)``: thread
``i`` is lane ``i % BLOCK`` of its block (Taichi's grid-stride loop keeps that), every thread of a
block must reach the same ``ti.simt.block.sync()`` calls, and indices ``i >= n`` are idle lanes.
CUDA only (shared memory); the CPU runs the plain kernels. Shared arrays are flat scalar arrays:
Taichi 1.7 compiles scalar shared atomics, not vector ones (taichi issue 8456).

The tile is channel-major (all momentum x, then y, z, mass): with the four channels of a node side by
side, the lanes of a warp adding at neighbouring nodes met on every 4th bank, and the shared atomics
were bank-bound: 1M particles, H200, the same run (2026-11-27), a substep took 0.81 -> 0.68 ms in
lattice order, 0.92 -> 0.71 ms sorted by sort_particles, 1.19 -> 0.81 ms shuffled then sorted once.
"""
from functools import lru_cache
from types import SimpleNamespace

import taichi as ti

from .grid_layout import add_node_vec

BLOCK = 128  # particles (threads) per CUDA block
TILE_NODES = 1024  # nodes a tile holds: 4 channels (momentum xyz, mass), 16 KB in float32
CHANNELS = 4


@ti.func
def blocked(n):
    """The loop range of a tiled kernel: n rounded up to whole blocks."""
    return (n + BLOCK - 1) // BLOCK * BLOCK


@lru_cache(maxsize=None)
def block_scatter_funcs(real) -> SimpleNamespace:
    @ti.func
    def tile_of_block(lane, active, base, bounds: ti.template()):
        """The block's tile: lower node and extent (nodes per axis) of the union of its active
        particles' 3x3x3 stencils (base: the particle's lowest node). Same on every lane."""
        if lane < 3:
            bounds[lane] = 1 << 30
            bounds[lane + 3] = -(1 << 30)
        ti.simt.block.sync()
        if active:
            for d in ti.static(range(3)):
                ti.atomic_min(bounds[d], base[d])
                ti.atomic_max(bounds[d + 3], base[d])
        ti.simt.block.sync()
        lo = ti.Vector([bounds[0], bounds[1], bounds[2]])
        extent = ti.Vector([bounds[3], bounds[4], bounds[5]]) - lo + 3
        return lo, extent

    @ti.func
    def tile_clear(lane, n_nodes, tile: ti.template()):
        j = lane
        while j < n_nodes:
            for c in ti.static(range(CHANNELS)):
                tile[c * TILE_NODES + j] = ti.cast(0.0, real)
            j += BLOCK
        ti.simt.block.sync()

    @ti.func
    def tile_slot(node, lo, extent):
        """(slot of node in the tile, slot strides along x and y; z's is 1)."""
        local = node - lo
        slot = (local[0] * extent[1] + local[1]) * extent[2] + local[2]
        return slot, ti.Vector([extent[1] * extent[2], extent[2]])

    @ti.func
    def tile_add(slot, momentum, mass, tile: ti.template()):
        """Adds a node's momentum (vec3) and mass to the tile (shared atomics). Channel-major: lanes
        at neighbouring nodes hit neighbouring shared-memory banks."""
        for c in ti.static(range(3)):
            ti.atomic_add(tile[c * TILE_NODES + slot], momentum[c])
        ti.atomic_add(tile[3 * TILE_NODES + slot], mass)

    @ti.func
    def tile_flush(lane, lo, extent, tile: ti.template(), grid_mv: ti.template(), grid_m: ti.template()):
        """Adds the tile's nonzero nodes to the grid (global atomics), after a sync."""
        ti.simt.block.sync()
        n_nodes = extent[0] * extent[1] * extent[2]
        j = lane
        while j < n_nodes:
            mass = tile[3 * TILE_NODES + j]
            momentum = ti.Vector([tile[j], tile[TILE_NODES + j], tile[2 * TILE_NODES + j]], real)
            if mass != 0.0:  # a node with momentum has mass: both come with the same weight
                node = lo + ti.Vector([j // (extent[1] * extent[2]), (j // extent[2]) % extent[1], j % extent[2]])
                add_node_vec(grid_mv, node, momentum)
                grid_m[node] += mass
            j += BLOCK

    return SimpleNamespace(tile_of_block=tile_of_block, tile_clear=tile_clear, tile_slot=tile_slot,
                           tile_add=tile_add, tile_flush=tile_flush)
