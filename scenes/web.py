"""The viewer's web front end (``python -m scenes.viewer --web``): the live scene served through viser.

For a GPU server without a display: the simulation runs where the GPU is and any browser that can
reach ``http://HOST:PORT`` shows it (tunnel the port with ``ssh -L 8080:localhost:8080 server``).
The page has the window's controls: pause, step, reset, record, the splat toggle, the colouring, and
E / nu / gravity sliders acting live, with substeps per second and the particle count. Particles are
a point cloud; the splat toggle shows the same Gaussians the package's rasterizer draws (viser's
own splat renderer in the browser). Record writes frames rendered by the package's rasterizer from
the viewer's camera to ``--out``.
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np

from scenes.viewer import COLOR_MODES, Controls, _write_recording


def covariances(scene) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(centers [N,3], covariances [N,3,3], rgb [N,3], opacities [N]) of what the splat mode draws."""
    import torch

    if scene.static:
        from render.reference import covariance

        g = scene.g
        cov = covariance(g["quats"], g["scales"], None)
        rgb, opacity, centers = scene.rgb, g["opacities"], g["means"]
    else:
        from bridge.surface import particles_to_gaussians

        s = scene.solver
        with torch.no_grad():
            g = particles_to_gaussians(s.positions(as_torch=True), s.deformation_gradients(as_torch=True),
                                       scene.radius, scene.colors("material"))
        a, b, c, d, e, f = g.covars.unbind(-1)
        cov = torch.stack([a, b, c, b, d, e, c, e, f], -1).reshape(-1, 3, 3)
        rgb, opacity, centers = g.colors, g.opacities, g.means
    as_np = lambda t: t.detach().float().cpu().numpy()  # noqa: E731
    return as_np(centers), as_np(cov), as_np(rgb.clamp(0, 1)), as_np(opacity)[:, None]


def serve(controls: Controls, host: str, port: int, fps: float, seconds: Optional[float] = None) -> dict:
    """Serve until Ctrl-C (or for ``seconds``); returns {"frames": frames simulated, "clients": most seen}."""
    import viser

    scene = controls.scene
    server = viser.ViserServer(host=host, port=port, verbose=False)
    server.scene.set_up_direction("+y")
    server.initial_camera.position = controls.orbit.eye()
    server.initial_camera.look_at = tuple(controls.orbit.target)
    clients = {"now": 0, "most": 0}

    @server.on_client_connect
    def _(client) -> None:
        clients["now"] += 1
        clients["most"] = max(clients["most"], clients["now"])
        print(f"web: client {client.client_id} connected", flush=True)

    @server.on_client_disconnect
    def _(client) -> None:
        clients["now"] -= 1

    gui = server.gui
    readout = gui.add_markdown(controls.readout())
    pause = gui.add_button("Pause / run")
    step = gui.add_button("Step one frame")
    reset = gui.add_button("Reset")
    record = gui.add_button("Record / stop")
    splats = gui.add_checkbox("Gaussian splats", controls.splats)
    color = gui.add_dropdown("Colour", COLOR_MODES, initial_value=controls.mode)
    sliders = None
    if not scene.static:
        sliders = (gui.add_slider("E [kPa]", 1.0, 200.0, 1.0, round(controls.E / 1e3, 1)),
                   gui.add_slider("nu", 0.0, 0.45, 0.01, round(controls.nu, 2)),
                   gui.add_slider("gravity y", -20.0, 0.0, 0.1, round(controls.gravity, 1)))
    pending = {"step": 0}
    pause.on_click(lambda _: setattr(controls, "paused", not controls.paused))
    step.on_click(lambda _: pending.__setitem__("step", pending["step"] + 1))
    reset.on_click(lambda _: pending.__setitem__("reset", True))

    def toggle_record(_):
        if controls.recording is None:
            controls.recording = []
        else:
            frames, controls.recording = controls.recording, None
            _write_recording(frames, controls.out, fps)

    record.on_click(toggle_record)

    point_size = float(scene.radius) * 2.0
    cloud = server.scene.add_point_cloud("/particles", scene.positions(), scene.colors(controls.mode).cpu().numpy(),
                                         point_size=point_size, point_shape="circle")
    splat_handle = None
    lo, hi = scene.bounds()
    server.scene.add_box("/domain", color=(180, 180, 180), dimensions=tuple((hi - lo).tolist()),
                         wireframe=True, position=tuple(((lo + hi) / 2).tolist()))
    print(f"web: serving the viewer at http://{host}:{port} (Ctrl-C stops)", flush=True)
    frames, start = 0, time.perf_counter()
    try:
        while seconds is None or time.perf_counter() - start < seconds:
            tick = time.perf_counter()
            if pending.pop("reset", False):
                scene.reset()
            if sliders is not None:
                controls.E, controls.nu, controls.gravity = (sliders[0].value * 1e3, sliders[1].value,
                                                             sliders[2].value)
                scene.set_parameters(controls.E, controls.nu, controls.gravity)
            controls.splats, controls.mode = splats.value, color.value
            if not controls.paused or pending["step"]:
                scene.step(1.0 / fps)
                pending["step"] = max(0, pending["step"] - 1)
                frames += 1
            with server.atomic():
                if controls.splats:
                    centers, cov, rgb, opacity = covariances(scene)
                    if splat_handle is not None:
                        splat_handle.remove()
                    splat_handle = server.scene.add_gaussian_splats("/splats", centers, cov, rgb, opacity)
                    cloud.visible = False
                else:
                    if splat_handle is not None:
                        splat_handle.remove()
                        splat_handle = None
                    cloud.points = scene.positions()
                    cloud.colors = scene.colors(controls.mode).cpu().numpy()
                    cloud.visible = True
                readout.content = controls.readout() + f"  \nclients: {clients['now']}"
            if controls.recording is not None:
                controls.recording.append(scene.splat(controls.camera(), controls.mode))
            time.sleep(max(0.0, 1.0 / fps - (time.perf_counter() - tick)))
    except KeyboardInterrupt:
        print("web: stopped (Ctrl-C)")
    finally:
        server.stop()
    return {"frames": frames, "clients": clients["most"]}
