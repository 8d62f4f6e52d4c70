"""nn.Module holding the learnable physical parameters of a differentiable MPM rollout.

    params = PhysicalParameters(scene, E=2e4, nu=0.3, velocity=(0, 0, 0))
    opt = torch.optim.Adam(params.parameters(), lr=0.05)
    traj = params(x0, n_substeps=200, frames=[50, 100, 200])   # bridge.simulate underneath

E is stored as log E (positive, scale-free steps), nu as a logit mapped into (0, NU_MAX), so any
optimizer step gives valid materials; the plastic models' parameters (``plastic={"yield_stress":
..., "friction_angle": ...}``, names as :func:`bridge.rollout.aux_per_particle`) as logs too. Each
quantity is per body (``scene.body``) or per particle.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from taichi_mpm.materials import PLASTIC_PARAMETERS
from taichi_mpm.validation import NU_LIMITS

from .rollout import RolloutScene, Trajectory, simulate

# A bound of the parameterisation, not a physical limit (that is NU_LIMITS): the sigmoid maps onto
# (0, NU_MAX) so that lam = E nu / ((1 + nu)(1 - 2 nu)) stays within 25x of E during an
# optimisation (at 0.499 it is 250x: the CFL time step chosen for the start would be broken).
NU_MAX = 0.49
assert NU_LIMITS[0] < 0.0 and NU_MAX < NU_LIMITS[1]
Value = Union[float, Sequence[float], torch.Tensor]


def _init(scene: RolloutScene, name: str, value: Value, per_particle: bool, tail=()) -> torch.Tensor:
    count = scene.n_particles if per_particle else scene.n_bodies
    t = torch.as_tensor(value, dtype=scene.dtype).to(scene.density.device)
    try:
        t = t.expand((count,) + tuple(tail)).clone()
    except RuntimeError:
        raise ValueError(f"{name} must broadcast to [{count}{''.join(', ' + str(d) for d in tail)}] "
                         f"({'per particle' if per_particle else 'per body'}), got shape {tuple(t.shape)}") from None
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite")
    return t


class LogElasticity:
    """The parameterisation every learnable material uses: ``log_E`` and ``nu_logit`` are stored
    (parameters or buffers of the module), E = exp(log_E) and nu = NU_MAX * sigmoid(nu_logit)."""

    @property
    def E(self) -> torch.Tensor:
        """Young's modulus (the shape of log_E: per body, per particle or a scalar)."""
        return self.log_E.exp()

    @property
    def nu(self) -> torch.Tensor:
        """Poisson's ratio in (0, NU_MAX)."""
        return NU_MAX * torch.sigmoid(self.nu_logit)


class PhysicalParameters(LogElasticity, nn.Module):
    """Learnable E, nu, initial velocity and (optionally) F controls of a scene.

    Args:
        scene: the :class:`RolloutScene` the parameters belong to.
        E: Young's modulus > 0 (scalar, per body or per particle).
        nu: Poisson's ratio in (0, NU_MAX).
        velocity: initial velocity, (3,) / [n_bodies, 3] / [N, 3]; None: not learnable, zero.
        per_particle: one value per particle instead of per body.
        n_controls: number of learnable F controls [n_controls, N, 3, 3] (zero-initialised), 0: none.
        learn: which of "E", "nu", "velocity", "controls" and the plastic parameter names are
            nn.Parameters (others are buffers).
        plastic: plastic models' parameters, e.g. {"yield_stress": 300.0} or {"friction_angle": 25.0},
            each > 0, scalar / per body / per particle; stored as logs.
    """

    def __init__(self, scene: RolloutScene, E: Value, nu: Value, velocity: Optional[Value] = None,
                 per_particle: bool = False, n_controls: int = 0,
                 learn: Sequence[str] = ("E", "nu", "velocity", "controls") + tuple(PLASTIC_PARAMETERS),
                 plastic: Optional[dict] = None):
        super().__init__()
        known = {"E", "nu", "velocity", "controls"} | set(PLASTIC_PARAMETERS)
        unknown = set(learn) - known
        if unknown:
            raise ValueError(f"learn may name {sorted(known)}; got {sorted(unknown)}")
        plastic = dict(plastic or {})
        bad = set(plastic) - set(PLASTIC_PARAMETERS)
        if bad:
            raise ValueError(f"plastic may hold {sorted(PLASTIC_PARAMETERS)}; got {sorted(bad)}")
        self.scene = scene
        E_t, nu_t = _init(scene, "E", E, per_particle), _init(scene, "nu", nu, per_particle)
        if (E_t <= 0).any():
            raise ValueError("E must be > 0")
        if ((nu_t <= 0) | (nu_t >= NU_MAX)).any():
            raise ValueError(f"nu must lie in (0, {NU_MAX})")
        self._register("log_E", E_t.log(), "E" in learn)
        self._register("nu_logit", torch.logit(nu_t / NU_MAX), "nu" in learn)
        velocity = (0.0, 0.0, 0.0) if velocity is None else velocity
        self._register("velocity", _init(scene, "velocity", velocity, per_particle, (3,)), "velocity" in learn)
        self.per_particle = per_particle
        self.plastic_names = tuple(sorted(plastic))
        for name in self.plastic_names:
            value = _init(scene, name, plastic[name], per_particle)
            if (value <= 0).any():
                raise ValueError(f"{name} must be > 0")
            self._register("log_" + name, value.log(), name in learn)
        if n_controls:
            zeros = torch.zeros((n_controls, scene.n_particles, 3, 3), dtype=scene.dtype,
                                device=scene.density.device)
            self._register("controls", zeros, "controls" in learn)
        else:
            self.controls = None

    def _register(self, name: str, value: torch.Tensor, learnable: bool) -> None:
        if learnable:
            self.register_parameter(name, nn.Parameter(value))
        else:
            self.register_buffer(name, value)

    def material(self) -> dict:
        """{"E", "nu"} and the plastic parameters, as :func:`bridge.simulate` takes them."""
        params = {"E": self.E, "nu": self.nu}
        for name in self.plastic_names:
            params[name] = getattr(self, "log_" + name).exp()
        return params

    def initial_velocity(self) -> torch.Tensor:
        """[N, 3] per-particle initial velocity."""
        return self.velocity if self.per_particle else self.velocity[self.scene.body]

    def forward(self, x0: torch.Tensor, n_substeps: int, frames: Sequence[int], **options) -> Trajectory:
        """bridge.simulate(scene, x0, initial_velocity(), material(), n_substeps, frames, controls)."""
        return simulate(self.scene, x0, self.initial_velocity(), self.material(), n_substeps, frames,
                        controls=self.controls, **options)

    def extra_repr(self) -> str:
        return (f"n_bodies={self.scene.n_bodies}, n_particles={self.scene.n_particles}, "
                f"per_particle={self.per_particle}, controls={None if self.controls is None else tuple(self.controls.shape)}")
