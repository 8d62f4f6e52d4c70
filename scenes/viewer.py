"""Viewer: watch a simulation live (Taichi GGUI window, offscreen frames, or a web page through viser).

    python -m scenes.viewer                       # the demo scene (jelly thrown onto sand) in a window
    python -m scenes.viewer bunny.obj             # any mesh trimesh reads (OBJ/PLY/STL...) as a jelly
    python -m scenes.viewer state.npz             # a state saved by MPMSolver.save_state
    python -m scenes.viewer point_cloud.ply       # a 3DGS PLY: its Gaussians' centres and colours
    python -m scenes.viewer --offscreen --frames 48   # no display: out/viewer/frame_*.png, viewer.mp4, viewer.gif
    python -m scenes.viewer --web --port 8080     # serve the live scene to a browser (viser), e.g. on a GPU server

Window controls: left drag orbits, right drag pans, W / S (or the slider) zoom; Space pauses, N steps
one frame, R resets, C starts / stops recording (written to --out), G toggles the package's own
Gaussian-splat rendering, M cycles the colouring (material, speed, stress), Esc quits. The panel's
sliders set the mesh body's E and nu and the gravity live, and show substeps per second and the
particle count.

GGUI draws through Vulkan. On a machine without a GPU, Mesa's software Vulkan (lavapipe; Debian /
Ubuntu: ``apt-get install mesa-vulkan-drivers``) makes ``--offscreen`` work; with no Vulkan at all,
``--offscreen`` renders the frames with the package's splatting rasterizer instead and says so.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from render.camera import Camera
from scenes import ASSETS
from scenes.cli import UserError, check_readable_file, mesh_fit, progress, run, scene_parser
from scenes.demo import DROP_POINT, JELLY_SIZE, build_scene
from scenes.media import write_animation
from scenes.particle_render import (PALETTE, checker_floor, ramp, render_gaussians, render_particles,
                                    stress_measure)

COLOR_MODES = ("material", "speed", "stress")
SCENES = ("demo",)


# ----------------------------------------------------------------------------- camera
@dataclass
class OrbitCamera:
    """Spherical coordinates around a target, y up."""

    target: tuple = (0.5, 0.25, 0.5)
    azimuth: float = 0.75
    elevation: float = 0.35
    distance: float = 1.8

    def drag(self, dx: float, dy: float) -> None:
        self.azimuth -= 3.0 * dx
        self.elevation = float(np.clip(self.elevation - 3.0 * dy, -1.4, 1.4))

    def zoom(self, factor: float) -> None:
        self.distance = float(np.clip(self.distance * factor, 0.05, 50.0))

    def pan(self, dx: float, dy: float) -> None:
        """Move the target in the view plane by a screen fraction (dx right, dy up)."""
        eye, right, up = self._frame()
        step = self.distance
        self.target = tuple(np.asarray(self.target) - step * dx * right - step * dy * up)

    def _frame(self):
        ce = math.cos(self.elevation)
        offset = np.array([ce * math.sin(self.azimuth), math.sin(self.elevation), ce * math.cos(self.azimuth)])
        forward = -offset
        right = np.cross(forward, [0.0, 1.0, 0.0])
        right /= max(np.linalg.norm(right), 1e-9)
        return np.asarray(self.target) + self.distance * offset, right, np.cross(right, forward)

    def eye(self) -> tuple:
        return tuple(self._frame()[0].tolist())

    def camera(self, width: int, height: int) -> Camera:
        return Camera.look_at(self.eye(), self.target, up=(0.0, 1.0, 0.0), width=width, height=height,
                              fov_y_degrees=40.0)


def to_gui(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8, row 0 at the top -> GGUI / ti.GUI's (W, H, 3) float, row 0 at the bottom."""
    return np.ascontiguousarray(np.flipud(image).transpose(1, 0, 2), dtype=np.float32) / 255.0


def from_gui(buffer: np.ndarray) -> np.ndarray:
    """GGUI's (W, H, 4) float frame buffer, row 0 at the bottom -> (H, W, 3) uint8, row 0 at the top."""
    rgb = np.flipud(np.asarray(buffer)[..., :3].transpose(1, 0, 2))
    return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------- what is shown
class LiveScene:
    """An MPM scene the viewer runs: step, reset, live E / nu / gravity, colours, splat rendering."""

    static = False

    def __init__(self, make: Callable[[], tuple], particles_per_cell: float, label: str):
        self.make, self.ppc, self.label = make, particles_per_cell, label
        self.reset()

    def reset(self) -> None:
        self.solver, bodies = self.make()
        s = self.solver
        self.body_of_id = torch.as_tensor(bodies, dtype=torch.long, device=s.device)
        self.radius = 0.5 * s.dx / self.ppc ** (1 / 3)
        self.floor = checker_floor(s.lower[[0, 2]], s.lower[[0, 2]] + (s.valid_upper - s.lower)[[0, 2]] + s.dx,
                                   height=s.valid_lower[1], device=s.device)
        ids = s.particle_ids(as_torch=True).long()
        first = self.body_of_id[ids] == 0
        self.E = float(s.state["E"][first].mean()) if first.any() else 1e4
        self.nu = float(s.state["nu"][first].mean()) if first.any() else 0.3
        self.gravity = float(s.gravity[1])
        self.substeps_per_second = 0.0

    @property
    def n_particles(self) -> int:
        return self.solver.n_particles

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return self.solver.lower.copy(), self.solver.lower + (np.asarray(self.solver.grid_shape) - 1) * self.solver.dx

    def step(self, frame_dt: float) -> int:
        start = time.perf_counter()
        n = self.solver.step(frame_dt)
        seconds = time.perf_counter() - start
        self.substeps_per_second = n / max(seconds, 1e-9)
        return n

    def set_parameters(self, E: float, nu: float, gravity: float) -> None:
        """E and nu of the first body (the mesh), and gravity along y, acting from the next substep."""
        s = self.solver
        if (E, nu) != (self.E, self.nu):
            first = self.body_of_id[s.particle_ids(as_torch=True).long()] == 0
            s.set_elastic_parameters(first, E, nu)
            self.E, self.nu = E, nu
        if gravity != self.gravity:
            s.set_gravity((0.0, gravity, 0.0))
            self.gravity = gravity

    def positions(self) -> np.ndarray:
        return self.solver.positions().astype(np.float32)

    def colors(self, mode: str) -> torch.Tensor:
        """(N, 3) float32 colours on the solver's device, in storage order."""
        s = self.solver
        if mode == "speed":
            return ramp(s.velocities(as_torch=True).norm(dim=1))
        if mode == "stress":
            return ramp(stress_measure(s.deformation_gradients(as_torch=True), s.state["E"], s.state["nu"]))
        palette = torch.as_tensor(PALETTE, dtype=torch.float32, device=s.device)
        return palette[self.body_of_id[s.particle_ids(as_torch=True).long()] % len(palette)]

    def splat(self, camera: Camera, mode: str) -> np.ndarray:
        s = self.solver
        return render_particles(s.positions(as_torch=True), s.deformation_gradients(as_torch=True), self.radius,
                                self.colors(mode), camera, floor=self.floor)


class GaussianCloud:
    """A 3DGS PLY shown as it is: no physics (step, reset and the sliders do nothing)."""

    static = True

    def __init__(self, path: Path):
        from render.ply import read_ply
        from render.sh import C0
        from taichi_mpm.runtime import device

        self.label = Path(path).name
        a = read_ply(path).activated()
        dev = device()
        self.g = {k: torch.from_numpy(np.ascontiguousarray(a[k])).float().to(dev)
                  for k in ("means", "quats", "scales", "opacities", "sh")}
        self.sh_degree = int(round(math.sqrt(self.g["sh"].shape[1]))) - 1
        self.rgb = (0.5 + C0 * self.g["sh"][:, 0]).clamp(0, 1)
        self.substeps_per_second, self.E, self.nu, self.gravity = 0.0, 0.0, 0.0, 0.0
        self.radius = float(self.g["scales"].max(1).values.median())

    n_particles = property(lambda self: len(self.g["means"]))

    def bounds(self):
        means = self.g["means"].cpu().numpy()
        lo, hi = np.quantile(means, 0.01, axis=0), np.quantile(means, 0.99, axis=0)
        return lo, hi

    def reset(self) -> None:
        pass

    def step(self, frame_dt: float) -> int:
        return 0

    def set_parameters(self, E, nu, gravity) -> None:
        pass

    def positions(self) -> np.ndarray:
        return self.g["means"].cpu().numpy().astype(np.float32)

    def colors(self, mode: str) -> torch.Tensor:
        return self.rgb

    def splat(self, camera: Camera, mode: str) -> np.ndarray:
        from bridge.rasterization import rasterize
        from render.camera import stack_cameras

        g, dev = self.g, self.g["means"].device
        viewmats, Ks = stack_cameras([camera], dev)
        with torch.no_grad():
            image, _, _ = rasterize(g["means"], g["quats"], g["scales"], g["opacities"], g["sh"], viewmats, Ks,
                                    camera.width, camera.height, sh_degree=self.sh_degree,
                                    backgrounds=torch.ones(1, 3, device=dev))
        return (image[0].clamp(0, 1) * 255).to(torch.uint8).cpu().numpy()


def classify(source: Optional[str]) -> str:
    """"scene" | "state" | "gaussians" | "mesh" for the positional argument."""
    if source is None or source in SCENES:
        return "scene"
    path = check_readable_file(Path(source), "input")
    if path.suffix.lower() == ".npz":
        return "state"
    if path.suffix.lower() == ".ply":
        with open(path, "rb") as f:
            header = f.read(4096).split(b"end_header")[0]
        if b"f_dc_0" in header and b"opacity" in header:
            return "gaussians"
    return "mesh"


def load(args):
    """The LiveScene / GaussianCloud the positional argument names."""
    kind = classify(args.source)
    if kind == "gaussians":
        return GaussianCloud(Path(args.source))
    if kind == "state":
        from taichi_mpm import MPMSolver

        path = Path(args.source)

        def make():
            with np.load(path) as data:
                if "grid_shape" not in data or "dx" not in data or "material" not in data:
                    raise ValueError(f"{path} is not a state written by MPMSolver.save_state")
                cells, dx = np.asarray(data["grid_shape"]) - 1, float(data["dx"])
            solver = MPMSolver(res=tuple(int(c) for c in cells), domain=((0, 0, 0), tuple(cells * dx)),
                               boundary="slip", friction=0.4)
            solver.load_state(path)
            materials = solver.material_ids()[np.argsort(solver.particle_ids())]
            return solver, np.unique(materials, return_inverse=True)[1]

        return LiveScene(make, args.ppc, path.name)
    mesh = ASSETS / "jelly.obj" if kind == "scene" else Path(args.source)
    placement = mesh_fit(args, DROP_POINT)
    return LiveScene(lambda: build_scene(mesh, args.res, args.ppc, placement), args.ppc,
                     "demo" if kind == "scene" else mesh.name)


# ----------------------------------------------------------------------------- front ends
class Controls:
    """What the user drives, shared by the GGUI and web front ends."""

    def __init__(self, scene, width: int, height: int, out: Path = Path("out/viewer")):
        self.scene, self.width, self.height, self.out = scene, width, height, Path(out)
        lo, hi = scene.bounds()
        extent = float(np.max(hi - lo))
        self.orbit = OrbitCamera(target=tuple(((lo + hi) / 2 * [1, 0.6, 1] + lo * [0, 0.4, 0]).tolist()),
                                 distance=1.8 * extent)
        self.paused, self.splats, self.mode = False, False, COLOR_MODES[0]
        self.recording: Optional[list] = None
        self.E, self.nu, self.gravity = scene.E, scene.nu, scene.gravity

    def camera(self) -> Camera:
        return self.orbit.camera(self.width, self.height)

    def cycle_mode(self) -> None:
        self.mode = COLOR_MODES[(COLOR_MODES.index(self.mode) + 1) % len(COLOR_MODES)]

    def readout(self) -> str:
        return (f"{self.scene.label}: {self.scene.n_particles:,} particles, "
                f"{self.scene.substeps_per_second:,.0f} substeps/s"
                + (", paused" if self.paused else "") + (", recording" if self.recording is not None else ""))


def has_display() -> bool:
    return sys.platform in ("win32", "darwin") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


class GGUIUnavailable(RuntimeError):
    pass


def open_window(width: int, height: int, show: bool):
    """A ti.ui.Window, or GGUIUnavailable with the reason (no Vulkan, no GGUI build)."""
    import taichi as ti

    try:
        return ti.ui.Window("taichi-mpm-splat viewer", (width, height), show_window=show, vsync=show)
    except Exception as error:  # Taichi raises RuntimeError; Vulkan loaders raise others
        raise GGUIUnavailable(str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__)


def run_ggui(controls: Controls, window, fps: float, frames: Optional[int], out: Path,
             seconds: Optional[float] = None) -> list:
    """The GGUI loop. ``frames``: stop after that many (offscreen) and return them; None: until the
    window closes, or after ``seconds``."""
    import taichi as ti

    scene_data = controls.scene
    n = scene_data.n_particles
    centers = ti.Vector.field(3, ti.f32, n)
    colors = ti.Vector.field(3, ti.f32, n)
    canvas, gui = window.get_canvas(), window.get_gui()
    scene3d = window.get_scene()
    camera = ti.ui.Camera()
    lo, hi = scene_data.bounds()
    floor_v = ti.Vector.field(3, ti.f32, 4)
    floor_v.from_numpy(np.array([[lo[0], lo[1], lo[2]], [hi[0], lo[1], lo[2]], [hi[0], lo[1], hi[2]],
                                 [lo[0], lo[1], hi[2]]], np.float32))
    floor_i = ti.field(ti.i32, 6)
    floor_i.from_numpy(np.array([0, 2, 1, 0, 3, 2], np.int32))
    captured, last_cursor = [], None
    frame, start = 0, time.perf_counter()
    interactive = frames is None  # an offscreen window has no events or cursor
    while window.running and (seconds is None or time.perf_counter() - start < seconds):
        for event in (window.get_events(ti.ui.PRESS) if interactive else ()):
            key = event.key
            if key == ti.ui.ESCAPE:
                window.running = False
            elif key == ti.ui.SPACE:
                controls.paused = not controls.paused
            elif key == "n":
                scene_data.step(1.0 / fps)
            elif key == "r":
                scene_data.reset()
            elif key == "g":
                controls.splats = not controls.splats
            elif key == "m":
                controls.cycle_mode()
            elif key in ("w", "s"):
                controls.orbit.zoom(0.9 if key == "w" else 1.1)
            elif key == "c":
                if controls.recording is None:
                    controls.recording = []
                else:
                    _write_recording(controls.recording, out, fps)
                    controls.recording = None
        if interactive:
            cursor = np.asarray(window.get_cursor_pos())
            if last_cursor is not None and window.is_pressed(ti.ui.LMB):
                controls.orbit.drag(*(cursor - last_cursor) * [1, -1])
            elif last_cursor is not None and window.is_pressed(ti.ui.RMB):
                controls.orbit.pan(*(cursor - last_cursor))
            last_cursor = cursor

        with gui.sub_window("taichi-mpm-splat", 0.01, 0.01, 0.42, 0.3):
            gui.text(controls.readout())
            gui.text(f"colour: {controls.mode} (M)   splats: {'on' if controls.splats else 'off'} (G)")
            if not scene_data.static:
                controls.E = gui.slider_float("E [kPa]", controls.E / 1e3, 1.0, 200.0) * 1e3
                controls.nu = gui.slider_float("nu", controls.nu, 0.0, 0.45)
                controls.gravity = gui.slider_float("gravity y", controls.gravity, -20.0, 0.0)
            controls.orbit.distance = gui.slider_float("distance", controls.orbit.distance, 0.05,
                                                       max(10.0, controls.orbit.distance))
        scene_data.set_parameters(controls.E, controls.nu, controls.gravity)
        if not controls.paused:
            scene_data.step(1.0 / fps)

        if controls.splats:
            canvas.set_image(to_gui(scene_data.splat(controls.camera(), controls.mode)))
        else:
            centers.from_numpy(scene_data.positions())
            colors.from_numpy(scene_data.colors(controls.mode).cpu().numpy().astype(np.float32))
            camera.position(*controls.orbit.eye())
            camera.lookat(*controls.orbit.target)
            camera.up(0.0, 1.0, 0.0)
            camera.fov(40.0)
            scene3d.set_camera(camera)
            scene3d.ambient_light((0.45, 0.45, 0.45))
            scene3d.point_light(pos=tuple(np.asarray(controls.orbit.eye()) + [0.0, 1.0, 0.0]), color=(0.8, 0.8, 0.8))
            scene3d.mesh(floor_v, floor_i, color=(0.82, 0.82, 0.8), two_sided=True)
            scene3d.particles(centers, radius=float(scene_data.radius), per_vertex_color=colors)
            canvas.set_background_color((1.0, 1.0, 1.0))
            canvas.scene(scene3d)
        if frames is not None or controls.recording is not None:
            image = from_gui(window.get_image_buffer_as_numpy())
            (captured if frames is not None else controls.recording).append(image)
        frame += 1
        if frame == 1:
            start = time.perf_counter()  # --seconds counts from the first frame (kernels compiled)
        if frames is not None:
            if frame >= frames:
                break
        else:
            window.show()
    if controls.recording:
        _write_recording(controls.recording, out, fps)
    if interactive:
        print(f"viewer closed after {frame} frames")
    return captured


def _write_recording(frames: list, out: Path, fps: float) -> None:
    if not frames:
        return
    name = time.strftime("record_%Y%m%d_%H%M%S")
    written = write_animation(frames, out / name, name, fps)
    print(f"recorded {len(frames)} frames to {out / name}/ ({written['gif'].name}"
          + (f", {written['mp4'].name}" if written["mp4"] else "") + ")")


def run_rasterizer(controls: Controls, fps: float, frames: int) -> list:
    """No GGUI: the same scene as frames from the package's splatting rasterizer."""
    images = []
    with progress(frames, "render (splatting rasterizer)", unit="frame") as bar:
        for _ in range(frames):
            controls.scene.step(1.0 / fps)
            images.append(controls.scene.splat(controls.camera(), controls.mode))
            bar.update()
    return images


class _ImguiIniGuard:
    """GGUI writes imgui.ini into the working directory when a window closes: remove ours."""

    def __enter__(self):
        self.path = Path.cwd() / "imgui.ini"
        self.existed = self.path.exists()
        return self

    def __exit__(self, *exc):
        if not self.existed and self.path.exists():
            self.path.unlink()


# ----------------------------------------------------------------------------- command line
def parser():
    p = scene_parser("viewer", __doc__, frames=48, fit_size=JELLY_SIZE)
    p.add_argument("source", nargs="?", default=None,
                   help="a scene name (demo), a mesh file, a saved state (.npz) or a 3DGS PLY (default: demo)")
    p.add_argument("--offscreen", action="store_true", help="no window: render --frames frames to --out as PNG, MP4, GIF")
    p.add_argument("--web", action="store_true", help="serve the live scene to a browser through viser")
    p.add_argument("--host", default="127.0.0.1", help="--web: address to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8080, help="--web: port")
    p.add_argument("--seconds", type=float, default=None,
                   help="window / --web: close after this long (default: when closed / Ctrl-C)")
    p.add_argument("--splats", action="store_true", help="start in Gaussian-splat rendering (G toggles)")
    p.add_argument("--color", choices=COLOR_MODES, default="material", help="particle colouring (M cycles)")
    p.add_argument("--fps", type=float, default=24.0, help="frames per second of simulated time and of the video")
    p.add_argument("--res", type=int, default=40, help="grid cells along the box side")
    p.add_argument("--ppc", type=float, default=8, help="particles per grid cell")
    p.add_argument("--width", type=int, default=640, help="window / frame width [px]")
    p.add_argument("--height", type=int, default=480, help="window / frame height [px]")
    return p


def body(args):
    if args.offscreen and args.web:
        raise UserError("choose one of --offscreen and --web")
    if not (args.web or args.offscreen or has_display()):
        raise UserError("no display here (DISPLAY / WAYLAND_DISPLAY unset): use --offscreen to write frames and "
                        "a video to --out, or --web to view it in a browser")
    if args.fps <= 0 or args.width < 16 or args.height < 16:
        raise ValueError("--fps must be > 0 and --width / --height at least 16 pixels")
    scene = load(args)
    controls = Controls(scene, args.width, args.height, args.out)
    controls.splats, controls.mode = args.splats, args.color
    if args.web:
        from scenes.web import serve

        return serve(controls, args.host, args.port, args.fps, args.seconds)
    try:
        with _ImguiIniGuard():
            window = open_window(args.width, args.height, show=not args.offscreen)
            try:
                frames = run_ggui(controls, window, args.fps, args.frames if args.offscreen else None, args.out,
                                  args.seconds)
            finally:
                window.destroy()
        renderer = "GGUI"
    except GGUIUnavailable as why:
        if not args.offscreen:
            raise UserError(f"the GGUI window cannot open ({why}); GGUI needs Vulkan (on Debian/Ubuntu: "
                            "apt-get install mesa-vulkan-drivers), or use --offscreen / --web") from None
        print(f"GGUI unavailable ({why}): rendering the frames with the package's splatting rasterizer instead")
        frames, renderer = run_rasterizer(controls, args.fps, args.frames), "rasterizer"
    if args.offscreen:
        if not frames:
            raise ValueError("--frames must be >= 1 with --offscreen")
        written = write_animation(frames, args.out, "viewer", args.fps)
        print(f"{len(frames)} frames ({renderer}) -> {args.out}/frame_*.png, "
              + ", ".join(str(p) for p in (written["mp4"], written["gif"]) if p is not None))
        return {"frames": frames, "renderer": renderer, **written}
    return None


def main(argv=None):
    return run(parser(), argv, body)


if __name__ == "__main__":
    main()
