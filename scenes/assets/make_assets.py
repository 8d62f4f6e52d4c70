"""Regenerate the small mesh assets in this folder: ``python scenes/assets/make_assets.py``.

Every shape is built procedurally with a fixed seed, so the files are reproducible. The shapes
below are centred at the origin and about one unit across, except the two "as downloaded" stand-ins
at the end, which come in odd units with the origin elsewhere (what ``MPMSolver.add_mesh``'s default
fit must cope with).

    jelly.obj          noise-displaced sphere, watertight
    torus.obj          torus (R 0.3, r 0.12), watertight
    open_sphere.obj    sphere of radius 0.5 with three round holes: not watertight, its nominal
                       solid is the ball (what the winding number fills)
    teapot_like.obj    a teapot silhouette from overlapping closed parts (lathed body, lid knob,
                       cone spout, torus handle). Not the Utah teapot: a self-intersecting union,
                       as many real meshes are
    checker_cube.obj   cube with UVs, .mtl and a 3x2 atlas PNG (one coloured checker per face)
    morph_sphere.obj   morphing source: sphere of radius 0.3
    morph_peanut.obj   morphing target: a peanut of revolution along z with the sphere's volume
                       (same topology, reachable by a continuous deformation)
    bunny_like.obj     stand-in for the Stanford bunny as downloaded: metres (0.18 m across),
                       origin below and beside it (bounds about x -0.10..0.08, y 0.04..0.21), y up,
                       overlapping parts, holes in the base (not watertight)
    teapot_raw.obj     stand-in for the Utah teapot as downloaded: about 4.3 units across, z up,
                       origin at the base, off-centre, the lid left open (not watertight)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import trimesh
from PIL import Image

HERE = Path(__file__).resolve().parent


def revolve(radii: np.ndarray, heights: np.ndarray, segments: int = 64) -> trimesh.Trimesh:
    """Closed surface of revolution about z of a profile whose two ends lie on the axis.

    radii, heights: [n] profile from bottom pole (radius 0) to top pole (radius 0).
    """
    assert radii[0] == 0.0 and radii[-1] == 0.0, "the profile must start and end on the axis"
    angles = np.linspace(0.0, 2.0 * np.pi, segments, endpoint=False)
    ring_r, ring_z = radii[1:-1], heights[1:-1]
    rings = np.stack(
        [np.outer(ring_r, np.cos(angles)), np.outer(ring_r, np.sin(angles)), np.repeat(ring_z[:, None], segments, 1)],
        axis=-1,
    ).reshape(-1, 3)
    bottom, top = len(rings), len(rings) + 1
    vertices = np.vstack([rings, [[0.0, 0.0, heights[0]], [0.0, 0.0, heights[-1]]]])
    j = np.arange(segments)
    jn = (j + 1) % segments
    faces = [np.stack([np.full(segments, bottom), jn, j], axis=1)]
    for ring in range(len(ring_r) - 1):
        a, b = ring * segments + j, ring * segments + jn
        c, d = a + segments, b + segments
        faces += [np.stack([a, b, d], axis=1), np.stack([a, d, c], axis=1)]
    last = (len(ring_r) - 1) * segments
    faces.append(np.stack([np.full(segments, top), last + j, last + jn], axis=1))
    mesh = trimesh.Trimesh(vertices, np.vstack(faces), process=True)
    if mesh.volume < 0:
        mesh.invert()
    return mesh


def jelly() -> trimesh.Trimesh:
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.5)
    rng = np.random.default_rng(7)
    directions = sphere.vertices / np.linalg.norm(sphere.vertices, axis=1, keepdims=True)
    frequencies = rng.normal(size=(6, 3)) * 2.5
    phases = rng.uniform(0.0, 2.0 * np.pi, size=6)
    noise = np.sin(directions @ frequencies.T + phases).mean(axis=1)
    sphere.vertices = directions * (0.5 * (1.0 + 0.35 * noise))[:, None]
    return sphere


def open_sphere() -> trimesh.Trimesh:
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.5)
    hole_axes = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [-0.6, -0.8, 0.0]])
    directions = sphere.triangles_center / np.linalg.norm(sphere.triangles_center, axis=1, keepdims=True)
    keep = np.all(directions @ hole_axes.T < np.cos(np.radians(25.0)), axis=1)
    sphere.update_faces(keep)
    sphere.remove_unreferenced_vertices()
    return sphere


def teapot_like(segments: int = 64) -> trimesh.Trimesh:
    """``segments`` around the body (the sections of spout and handle follow it)."""
    t = np.linspace(0.0, np.pi, 40 * segments // 64)
    body = revolve(np.r_[0.0, 0.42 * np.sin(t[1:-1]) ** 0.8, 0.0], -0.3 * np.cos(t) * 0.9, segments=segments)
    knob = trimesh.creation.icosphere(subdivisions=2, radius=0.07)
    knob.apply_translation([0.0, 0.0, 0.3])
    spout = trimesh.creation.cone(radius=0.09, height=0.45, sections=segments // 2)
    spout.apply_transform(trimesh.transformations.rotation_matrix(np.radians(55.0), [0.0, 1.0, 0.0]))
    spout.apply_translation([0.25, 0.0, -0.12])
    handle = trimesh.creation.torus(major_radius=0.16, minor_radius=0.035, major_sections=3 * segments // 4,
                                     minor_sections=segments // 4)
    handle.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 2, [1.0, 0.0, 0.0]))
    handle.apply_translation([-0.4, 0.0, 0.0])
    return trimesh.util.concatenate([body, knob, spout, handle])


def ellipsoid(radii, center, subdivisions: int = 2) -> trimesh.Trimesh:
    mesh = trimesh.creation.icosphere(subdivisions=subdivisions, radius=1.0)
    mesh.apply_scale(radii)
    mesh.apply_translation(center)
    return mesh


def bunny_like() -> trimesh.Trimesh:
    """Body, head, two ears and a tail as overlapping ellipsoids; the base cut open."""
    parts = [
        ellipsoid((0.070, 0.055, 0.055), (-0.010, 0.085, 0.0)),
        ellipsoid((0.035, 0.032, 0.030), (0.045, 0.130, 0.0)),
        ellipsoid((0.010, 0.035, 0.007), (0.035, 0.170, 0.014)),
        ellipsoid((0.010, 0.035, 0.007), (0.040, 0.170, -0.014)),
        ellipsoid((0.015, 0.015, 0.015), (-0.080, 0.090, 0.0), subdivisions=1),
    ]
    body = parts[0]
    keep = body.triangles_center[:, 1] > 0.045  # scanner holes: the base of the body is missing
    body.update_faces(keep)
    body.remove_unreferenced_vertices()
    return trimesh.util.concatenate(parts)


def teapot_raw() -> trimesh.Trimesh:
    """The teapot-like union, coarser, in "Utah" units: z up, base at z = 0, shifted in x; lid open."""
    mesh = teapot_like(segments=24)
    mesh.update_faces(mesh.triangles_center[:, 2] < 0.26)  # cut the top off: an open lid
    mesh.remove_unreferenced_vertices()
    mesh.apply_scale(3.2 / 0.9)
    mesh.apply_translation([1.0, 0.5, -mesh.bounds[0][2]])
    return mesh


def peanut(volume: float) -> trimesh.Trimesh:
    z = np.linspace(-1.0, 1.0, 61)
    radius = np.sqrt(np.clip(1.0 - z**2, 0.0, None)) * (1.0 - 0.3 * np.exp(-((z / 0.3) ** 2)))
    radius[[0, -1]] = 0.0
    mesh = revolve(0.45 * radius, z, segments=48)
    mesh.apply_scale((volume / mesh.volume) ** (1.0 / 3.0))
    return mesh


def write_checker_cube(folder: Path) -> None:
    """Cube of side 1 with per-face UVs into a 3x2 atlas; writes .obj, .mtl and .png."""
    tile = 64
    colours = [(220, 60, 60), (60, 180, 75), (65, 105, 225), (240, 200, 40), (200, 80, 200), (40, 190, 200)]
    atlas = np.zeros((2 * tile, 3 * tile, 3), dtype=np.uint8)
    checker = ((np.arange(tile)[:, None] // 16 + np.arange(tile)[None, :] // 16) % 2).astype(bool)
    for face, colour in enumerate(colours):
        row, col = divmod(face, 3)
        block = np.where(checker[..., None], np.array(colour, np.uint8), np.uint8(245))
        atlas[row * tile : (row + 1) * tile, col * tile : (col + 1) * tile] = block
    Image.fromarray(atlas).save(folder / "checker_cube.png")
    (folder / "checker_cube.mtl").write_text(
        "newmtl checker\nKa 1 1 1\nKd 1 1 1\nKs 0 0 0\nmap_Kd checker_cube.png\n"
    )
    corners = np.array([[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)])
    # each face: four corner indices counter-clockwise seen from outside
    quads = [(1, 5, 7, 3), (4, 0, 2, 6), (2, 3, 7, 6), (0, 4, 5, 1), (4, 6, 7, 5), (0, 1, 3, 2)]
    lines = ["mtllib checker_cube.mtl", "o checker_cube"]
    lines += [f"v {x:g} {y:g} {z:g}" for x, y, z in corners]
    for face in range(6):
        row, col = divmod(face, 3)
        u0, u1 = col / 3 + 0.01, (col + 1) / 3 - 0.01
        v1, v0 = 1 - row / 2 - 0.01, 1 - (row + 1) / 2 + 0.01  # v runs upwards in OBJ
        lines += [f"vt {u0:.4f} {v0:.4f}", f"vt {u1:.4f} {v0:.4f}", f"vt {u1:.4f} {v1:.4f}", f"vt {u0:.4f} {v1:.4f}"]
    lines.append("usemtl checker")
    for face, (a, b, c, d) in enumerate(quads):
        t = 4 * face
        lines.append(f"f {a + 1}/{t + 1} {b + 1}/{t + 2} {c + 1}/{t + 3}")
        lines.append(f"f {a + 1}/{t + 1} {c + 1}/{t + 3} {d + 1}/{t + 4}")
    (folder / "checker_cube.obj").write_text("\n".join(lines) + "\n")


def export(mesh: trimesh.Trimesh, path: Path) -> None:
    path.write_text(trimesh.exchange.obj.export_obj(mesh, include_normals=False, include_texture=False, digits=5))


def main(folder: Path = HERE) -> None:
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.3)
    meshes = {
        "jelly": jelly(),
        "torus": trimesh.creation.torus(major_radius=0.3, minor_radius=0.12, major_sections=64, minor_sections=32),
        "open_sphere": open_sphere(),
        "teapot_like": teapot_like(),
        "morph_sphere": sphere,
        "morph_peanut": peanut(sphere.volume),
        "bunny_like": bunny_like(),
        "teapot_raw": teapot_raw(),
    }
    for name, mesh in meshes.items():
        export(mesh, folder / f"{name}.obj")
        print(f"{name}.obj: {len(mesh.faces)} faces, watertight {mesh.is_watertight}")
    write_checker_cube(folder)
    print("checker_cube.obj + .mtl + .png")


if __name__ == "__main__":
    main()
