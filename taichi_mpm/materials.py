"""Materials as small named options.

Each material is a frozen dataclass that validates itself on construction and knows how to turn
into the per-particle arrays the substep kernels read:

    material id  (int32)     which constitutive model (the ``*_ID`` constants below)
    E            (real)      Young's modulus [Pa]; for :class:`Fluid` the bulk modulus
    nu           (real)      Poisson's ratio; 0 for :class:`Fluid`
    density      (real)      [kg/m^3]
    aux          (real x 4)  the model's own parameters, laid out per model:
        VonMises: (yield_stress, 0, 0, 0)
        Snow:     (hardening xi, critical_compression theta_c, critical_stretch theta_s, 0)
        Sand:     (alpha = sqrt(2/3) 2 sin(phi) / (3 - sin(phi)), 0, 0, 0)

E and nu stay separate arrays (not lam/mu) so that gradients w.r.t. them come straight out of the
kernels (Lame parameters are computed inside, see ``constitutive.lame``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple, Union

from .validation import NU_LIMITS, check_number, check_positive

FIXED_COROTATED_ID = 0
NEO_HOOKEAN_ID = 1
VON_MISES_ID = 2
SNOW_ID = 3
SAND_ID = 4
FLUID_ID = 5
PLASTIC_IDS = (VON_MISES_ID, SNOW_ID, SAND_ID)  # models whose return maps need the SVD


def plastic_model_set(material_ids) -> int:
    """The plastic models among ``material_ids`` as a bit set (bit id for model id): kernels that
    take it as a compile-time argument build only those models' code."""
    present = {int(m) for m in material_ids}
    return sum(1 << i for i in PLASTIC_IDS if i in present)

# Snow hardening multiplies the moduli by at most this (the kernels clamp it), so the CFL
# condition uses sqrt of it on the wave speed.
SNOW_MAX_HARDENING = 5.0


def _check_positive(owner: str, name: str, value: float) -> None:
    check_positive(f"{owner}.{name}", value)


def _check_poisson(owner: str, nu: float) -> None:
    check_number(f"{owner}.nu", nu, NU_LIMITS[0], NU_LIMITS[1], low_open=True, high_open=True)


def sand_alpha(friction_angle, lib=math):
    """Drucker-Prager alpha = sqrt(2/3) 2 sin(phi) / (3 - sin(phi)) of a friction angle phi in
    degrees; ``lib`` = math for floats, torch for (differentiable) tensors."""
    s = lib.sin(friction_angle * (math.pi / 180.0))
    return math.sqrt(2.0 / 3.0) * 2.0 * s / (3.0 - s)


def _identity(value, lib=math):
    return value


# The plastic models' parameters as the differentiable rollout takes them (bridge.simulate's
# params): name -> (material id, aux column, map from the user's value to the aux entry).
PLASTIC_PARAMETERS = {
    "yield_stress": (VON_MISES_ID, 0, _identity),
    "hardening": (SNOW_ID, 0, _identity),
    "critical_compression": (SNOW_ID, 1, _identity),
    "critical_stretch": (SNOW_ID, 2, _identity),
    "friction_angle": (SAND_ID, 0, sand_alpha),
}


def lame_parameters(E: float, nu: float) -> Tuple[float, float]:
    """(mu, lam) from Young's modulus and Poisson's ratio."""
    return E / (2.0 * (1.0 + nu)), E * nu / ((1.0 + nu) * (1.0 - 2.0 * nu))


@dataclass(frozen=True)
class _ElasticBase:
    E: float = 1e5
    nu: float = 0.2
    density: float = 1000.0

    def __post_init__(self):
        name = type(self).__name__
        _check_positive(name, "E", self.E)
        _check_poisson(name, self.nu)
        _check_positive(name, "density", self.density)

    def wave_speed(self) -> float:
        """Speed of the P wave sqrt((lam + 2 mu) / rho) [m/s], used by the CFL condition."""
        mu, lam = lame_parameters(self.E, self.nu)
        return math.sqrt((lam + 2.0 * mu) / self.density)

    def aux(self) -> Tuple[float, float, float, float]:
        return (0.0, 0.0, 0.0, 0.0)


@dataclass(frozen=True)
class Elastic(_ElasticBase):
    """Hyperelastic solid. model: "fixed_corotated" (Stomakhin 2012) or "neo_hookean"."""

    model: str = "fixed_corotated"

    def __post_init__(self):
        super().__post_init__()
        if self.model not in ("fixed_corotated", "neo_hookean"):
            raise ValueError(
                f"Elastic.model must be 'fixed_corotated' or 'neo_hookean', got {self.model!r}")

    @property
    def material_id(self) -> int:
        return FIXED_COROTATED_ID if self.model == "fixed_corotated" else NEO_HOOKEAN_ID


@dataclass(frozen=True)
class VonMises(_ElasticBase):
    """Elastoplastic metal / plasticine: Hencky elasticity, von Mises yield on the Hencky strain."""

    yield_stress: float = 1e3

    def __post_init__(self):
        super().__post_init__()
        _check_positive("VonMises", "yield_stress", self.yield_stress)

    material_id = VON_MISES_ID

    def aux(self):
        return (float(self.yield_stress), 0.0, 0.0, 0.0)


@dataclass(frozen=True)
class Snow(_ElasticBase):
    """Snow (Stomakhin et al. 2013): fixed-corotated elasticity with singular values clamped to
    [1 - critical_compression, 1 + critical_stretch] and hardening exp(hardening (1 - Jp))."""

    E: float = 1.4e5
    density: float = 400.0
    hardening: float = 10.0
    critical_compression: float = 2.5e-2
    critical_stretch: float = 7.5e-3

    def __post_init__(self):
        super().__post_init__()
        _check_positive("Snow", "hardening", self.hardening)
        _check_positive("Snow", "critical_compression", self.critical_compression)
        _check_positive("Snow", "critical_stretch", self.critical_stretch)
        if self.critical_compression >= 1.0:
            raise ValueError(f"Snow.critical_compression must be < 1, got {self.critical_compression!r}")

    material_id = SNOW_ID

    def wave_speed(self) -> float:
        return super().wave_speed() * math.sqrt(SNOW_MAX_HARDENING)

    def aux(self):
        return (float(self.hardening), float(self.critical_compression),
                float(self.critical_stretch), 0.0)


@dataclass(frozen=True)
class Sand(_ElasticBase):
    """Dry sand (Klar et al. 2016): Hencky elasticity, Drucker-Prager yield with the given
    friction angle (degrees), no cohesion; volume gained in tension is tracked (Tampubolon 2017)."""

    E: float = 3.5e5
    nu: float = 0.3
    density: float = 1600.0
    friction_angle: float = 30.0

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.friction_angle, (int, float)) and 0.0 < self.friction_angle < 90.0):
            raise ValueError(f"Sand.friction_angle must lie in (0, 90) degrees, got {self.friction_angle!r}")

    material_id = SAND_ID

    def aux(self):
        return (sand_alpha(float(self.friction_angle)), 0.0, 0.0, 0.0)


@dataclass(frozen=True)
class Fluid:
    """Weakly compressible fluid: pressure K (1 - J) from the bulk modulus K, no shear stress."""

    bulk_modulus: float = 1e5
    density: float = 1000.0

    def __post_init__(self):
        _check_positive("Fluid", "bulk_modulus", self.bulk_modulus)
        _check_positive("Fluid", "density", self.density)

    material_id = FLUID_ID

    @property
    def E(self) -> float:  # the kernels read the bulk modulus from the E array
        return self.bulk_modulus

    @property
    def nu(self) -> float:
        return 0.0

    def wave_speed(self) -> float:
        return math.sqrt(self.bulk_modulus / self.density)

    def aux(self):
        return (0.0, 0.0, 0.0, 0.0)


Material = Union[Elastic, VonMises, Snow, Sand, Fluid]
MATERIAL_TYPES = (Elastic, VonMises, Snow, Sand, Fluid)


def wave_speed(material_id: int, E, nu, density):
    """Vectorised P-wave speed (numpy arrays in, array out) for per-particle parameters."""
    import numpy as np

    E, nu, density = (np.asarray(a, dtype=np.float64) for a in (E, nu, density))
    mu, lam = lame_parameters(E, nu)
    if material_id == FLUID_ID:
        modulus = E
    else:
        modulus = lam + 2.0 * mu
    c = np.sqrt(modulus / density)
    return c * math.sqrt(SNOW_MAX_HARDENING) if material_id == SNOW_ID else c
