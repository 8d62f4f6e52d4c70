"""The per-splat record: one row of floats per item (camera c's splat of Gaussian n, item c * N + n;
in 2D, Gaussian n), written by the projection (render/projection.py) or the 2D preprocess
(render/splat2d.py) and read by the blend kernels (render/blending.py), whose backward accumulates
the gradients into an array of the same layout.

One array where there were five (means2D, conics, opacities, colours, depths): a launch passes
one argument for them, a kernel holds one base pointer, and a splat's values sit side by side.
"""

MEAN, CONIC, OPACITY = 0, 2, 5  # columns of the screen-space mean (2), conic (3), opacity
GEOMETRY = 6  # columns before the features; a record whose features follow the geometry
RGB, DEPTH = 6, 9  # the 3D projection's colour (3) and camera-space depth columns
PROJECTED = 10  # the width of the 3D projection's records
