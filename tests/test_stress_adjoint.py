"""The hand-written adjoint of the elastic stress stage (substep.particle_stress_grad) against float64
central finite differences of particle_stress itself, per material and per input.

L = <W_A, affine> + <W_F, F[dst]> + w_p plastic[dst] over a few particles of one material with
random C, F, E, nu and an F control. Each input (C, F, dFc, E, nu) is checked on its own along a
random direction of that input. Tolerance argument: particle_stress is smooth in every input here
(the polar iteration stops at rounding: constitutive.POLAR_TOLERANCE), so with h ~1e-6 of each
input's scale the FD's truncation (h^2 |L'''|) and rounding (eps |L| / h) errors are ~1e-9 of the
derivative; RTOL = 1e-6 is margin, while the mutations in the docstrings move it by >= 1e-3.
The corotated cases include F with two equal singular values and a strongly rotated, stretched F.
"""
import numpy as np
import pytest
import torch

f64 = torch.float64
RTOL, ATOL = 1e-6, 1e-12
N = 4
INPUTS = {"C": 1e-6, "F": 1e-6, "dFc": 1e-6, "E": 1e-3, "nu": 1e-8}
DT, INV_DX = 1e-3, 16.0


def rotation(seed):
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=f64))
    return q * torch.sign(torch.det(q))


def deformations(case: str) -> torch.Tensor:
    """[N, 3, 3] F of the particles."""
    g = torch.Generator().manual_seed(5)
    if case == "near identity":
        return torch.eye(3, dtype=f64) + 0.05 * torch.randn(N, 3, 3, generator=g, dtype=f64)
    if case == "two equal singular values":
        return torch.stack([rotation(i) @ torch.diag(torch.tensor([1.1, 1.1, 0.8], dtype=f64)) @ rotation(9 + i).T
                            for i in range(N)])
    assert case == "large rotation and stretch"
    return torch.stack([rotation(i) @ torch.diag(torch.tensor([1.6, 0.9, 0.55], dtype=f64)) @ rotation(5 + i).T
                        for i in range(N)])


@pytest.fixture(scope="module")
def kernels(ti_arch):
    import taichi as ti
    from taichi_mpm.substep import substep_kernels

    return substep_kernels(ti.f64, plastic_models=False)


def make_inputs(material_id: int, case: str, device) -> dict:
    g = torch.Generator().manual_seed(material_id)
    rnd = lambda *s: torch.randn(s, generator=g, dtype=f64)  # noqa: E731
    F = torch.zeros(2, N, 3, 3, dtype=f64)
    F[0] = deformations(case)
    C = torch.zeros(2, N, 3, 3, dtype=f64)
    C[0] = 2.0 * rnd(N, 3, 3)
    data = dict(C=C, F=F, dFc=0.02 * rnd(N, 3, 3), E=1e4 * (1 + 0.5 * torch.rand(N, generator=g, dtype=f64)),
                nu=0.2 + 0.2 * torch.rand(N, generator=g, dtype=f64), density=1e3 + 100 * torch.rand(N, generator=g, dtype=f64),
                volume=1e-5 * (1 + torch.rand(N, generator=g, dtype=f64)),
                W_A=rnd(N, 3, 3), W_F=rnd(N, 3, 3), w_p=rnd(N))
    data = {k: v.to(device) for k, v in data.items()}
    data["material"] = torch.full((N,), material_id, dtype=torch.int32, device=device)
    data["directions"] = {name: rnd(*data[name].shape).to(device) for name in INPUTS}
    for name in ("C", "F"):  # only slot 0 (src) is an input
        data["directions"][name][1] = 0.0
    return data


def loss(kernels, d, **override) -> float:
    """L of particle_stress on the inputs (with any replaced by override)."""
    x = dict(d, **override)
    F = x["F"].clone()
    plastic = torch.ones(2, N, dtype=f64, device=F.device)
    affine = torch.zeros(N, 3, 3, dtype=f64, device=F.device)
    aux = torch.zeros(N, 4, dtype=f64, device=F.device)
    kernels.particle_stress(0, 1, N, x["C"], F, plastic, x["material"], x["E"], x["nu"], x["density"], x["volume"],
                            aux, x["dFc"], 1.0, affine, INV_DX, DT)
    return float((affine * d["W_A"]).sum() + (F[1] * d["W_F"]).sum() + (plastic[1] * d["w_p"]).sum())


def adjoint(kernels, d) -> dict:
    z = torch.zeros_like
    g_C, g_F, g_plastic = z(d["C"]), z(d["F"]), torch.zeros(2, N, dtype=f64, device=d["F"].device)
    g_F[1] = d["W_F"]
    g_plastic[1] = d["w_p"]
    g_E, g_nu, g_dFc = z(d["E"]), z(d["nu"]), z(d["dFc"])
    kernels.particle_stress_grad(0, 1, N, d["C"], d["F"], d["material"], d["E"], d["nu"], d["density"], d["volume"],
                                 d["dFc"], 1.0, d["W_A"], g_C, g_F, g_plastic, g_E, g_nu, g_dFc, INV_DX, DT)
    assert torch.equal(g_plastic[0], d["w_p"])  # the elastic models carry plastic over unchanged
    return dict(C=g_C, F=g_F, dFc=g_dFc, E=g_E, nu=g_nu)


CASES = [("fixed_corotated", "near identity"), ("fixed_corotated", "two equal singular values"),
         ("fixed_corotated", "large rotation and stretch"), ("neo_hookean", "near identity"),
         ("neo_hookean", "large rotation and stretch"), ("fluid", "near identity")]


@pytest.mark.parametrize("model,case", CASES)
@pytest.mark.parametrize("name", sorted(INPUTS))
def test_stress_adjoint_matches_fd(kernels, device, model, case, name):
    """Shown to catch (each alone): the rotation's adjoint dropped (corotated C, F, dFc fail); the
    Lame d lam / d nu numerator 1 + 2 nu^2 changed to 1 + 2.5 nu^2 (nu fails); the neo-Hookean
    log-J adjoint halved (6 neo-Hookean checks fail); the fluid's J^(1/3) reset term dropped
    (fluid C, F, dFc fail)."""
    from taichi_mpm.materials import FIXED_COROTATED_ID, FLUID_ID, NEO_HOOKEAN_ID

    material_id = {"fixed_corotated": FIXED_COROTATED_ID, "neo_hookean": NEO_HOOKEAN_ID, "fluid": FLUID_ID}[model]
    d = make_inputs(material_id, case, device)
    ours = float((adjoint(kernels, d)[name] * d["directions"][name]).sum())
    h = INPUTS[name]
    fd = (loss(kernels, d, **{name: d[name] + h * d["directions"][name]})
          - loss(kernels, d, **{name: d[name] - h * d["directions"][name]})) / (2 * h)
    assert np.isfinite(ours)
    assert abs(ours - fd) <= RTOL * abs(fd) + ATOL, (model, case, name, ours, fd)


@pytest.mark.parametrize("case", ["near identity", "two equal singular values", "large rotation and stretch"])
def test_corotated_stress_in_float32_matches_float64(kernels, device, case):
    """The float32 stress (polar iteration stopped at constitutive.POLAR_TOLERANCE["f32"]) agrees
    with the float64 one to float32 rounding, relative to the stress's scale. Shown to catch a
    float32 tolerance of 1e-2 (the iteration stopped a step early: off by ~1e-4)."""
    import taichi as ti
    from taichi_mpm.materials import FIXED_COROTATED_ID
    from taichi_mpm.substep import substep_kernels

    d = make_inputs(FIXED_COROTATED_ID, case, device)
    out = {}
    for real, dtype, k in ((ti.f64, f64, kernels), (ti.f32, torch.float32, substep_kernels(ti.f32, plastic_models=False))):
        x = {name: d[name].to(dtype) for name in ("C", "F", "dFc", "E", "nu", "density", "volume")}
        plastic = torch.ones(2, N, dtype=dtype, device=device)
        affine = torch.zeros(N, 3, 3, dtype=dtype, device=device)
        aux = torch.zeros(N, 4, dtype=dtype, device=device)
        k.particle_stress(0, 1, N, x["C"], x["F"], plastic, d["material"], x["E"], x["nu"], x["density"],
                          x["volume"], aux, x["dFc"], 1.0, affine, INV_DX, DT)
        out[real] = (affine.double(), x["F"][1].double())
    for ours, exact in zip(out[ti.f32], out[ti.f64]):
        assert (ours - exact).abs().max() <= 2e-6 * exact.abs().max(), (case, (ours - exact).abs().max())
