"""Item loops with a trip count Taichi knows when it compiles (one CUDA launch a loop, not two).

Taichi 1.7 offloads a top-level ``for i in range(n)`` whose bound is known only at run time (an
array's shape, a kernel argument) as two tasks: a serial one that computes n into a global
temporary, then the parallel loop. On CUDA each task is its own kernel launch with its own host
cost (the driver call and Taichi's bookkeeping around it). A loop over a compile-time number of
lanes, each lane striding over the items, is a single task: :func:`for_items`, called at a kernel's
top level (Taichi inlines it, so its loop is the kernel's parallel loop).

Consecutive lanes take consecutive items, so a warp's loads stay coalesced. The CPU keeps the plain
loop (``lanes`` 0): a serial task there is a function call, and each thread's contiguous block of
items suits its caches.
"""

import taichi as ti

from taichi_mpm.runtime import ensure_init

# 2048 blocks of 128 threads: about one resident wave on an H100 or H200 (132 SMs x 16 such blocks),
# so that small problems launch little beyond their items and large ones keep every SM busy
CUDA_LANES = 1 << 18


def item_lanes() -> int:
    """The lane count the item kernels are compiled for on this arch: CUDA_LANES, or 0 on the CPU."""
    return CUDA_LANES if ensure_init() == "cuda" else 0


@ti.func
def for_items(num_items, lanes: ti.template(), body: ti.template(), args: ti.template()):
    """body(i, *args) for every item i < num_items, as the kernel's parallel loop: over ``lanes``
    (compile-time) lanes each striding over the items, or over the items themselves (lanes 0)."""
    if ti.static(lanes):
        for lane in range(lanes):  # constant bound: no serial task
            i = lane
            while i < num_items:  # read inside the loop, so that nothing runs before it
                body(i, *args)
                i += lanes
    else:
        for i in range(num_items):
            body(i, *args)
