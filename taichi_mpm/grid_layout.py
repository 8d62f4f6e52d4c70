"""How the grid's vector arrays (momentum, velocity and their adjoints) are stored: channel-major,
``[3, X, Y, Z]``, each component a grid of its own.

Why: the transfers read and write a component for 32 neighbouring nodes at a time (a warp's lanes at
neighbouring stencils, or a tile's flush along a row). Node-major ``[X, Y, Z, 3]`` spreads those 32
floats over 384 bytes, so each of the three component loads or stores touches three times the cache
lines it needs; channel-major keeps each one in a single run. The scalar mass grid is ``[X, Y, Z]``.
"""
import taichi as ti


@ti.func
def node_vec(grid: ti.template(), I):
    """The 3-vector at node I of a channel-major grid."""
    return ti.Vector([grid[0, I[0], I[1], I[2]], grid[1, I[0], I[1], I[2]], grid[2, I[0], I[1], I[2]]])


@ti.func
def set_node_vec(grid: ti.template(), I, value):
    for c in ti.static(range(3)):
        grid[c, I[0], I[1], I[2]] = value[c]


@ti.func
def add_node_vec(grid: ti.template(), I, value):
    """Atomic add, component by component."""
    for c in ti.static(range(3)):
        grid[c, I[0], I[1], I[2]] += value[c]


@ti.func
def node_shape(grid: ti.template()):
    """The node counts (X, Y, Z) of a channel-major vector grid."""
    return ti.Vector([grid.shape[1], grid.shape[2], grid.shape[3]])


def vector_grid_shape(grid_shape) -> tuple:
    """The torch shape of a vector grid over ``grid_shape`` nodes."""
    return (3,) + tuple(grid_shape)
