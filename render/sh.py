"""Real spherical harmonics of degree 0-3 to RGB (the 3DGS convention), forward and hand-written backward.

RGB = max(sum_k basis_k(dir) * coeffs[k] + 0.5, 0), with ``dir`` the unit vector from the camera
centre to the Gaussian. Coefficient arrays hold at least (degree+1)^2 rows per Gaussian; the rows
past the active degree are ignored (the 3DGS schedule raises the degree during training).
"""

import taichi as ti

C0 = 0.28209479177387814
C1 = 0.4886025119029199
C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792,
      0.5462742152960396)
C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
      -0.4570457994644658, 1.445305721320277, -0.5900435899266435)


def num_sh_bases(degree: int) -> int:
    return (degree + 1) ** 2


@ti.func
def _basis_and_grad(d, k: ti.template()):
    """Basis function k at unit direction d and its gradient with respect to d."""
    x, y, z = d[0], d[1], d[2]
    value = 0.0
    grad = ti.math.vec3(0.0)
    if ti.static(k == 0):
        value = C0
    elif ti.static(k == 1):
        value, grad = -C1 * y, ti.math.vec3(0.0, -C1, 0.0)
    elif ti.static(k == 2):
        value, grad = C1 * z, ti.math.vec3(0.0, 0.0, C1)
    elif ti.static(k == 3):
        value, grad = -C1 * x, ti.math.vec3(-C1, 0.0, 0.0)
    elif ti.static(k == 4):
        value, grad = C2[0] * x * y, ti.math.vec3(C2[0] * y, C2[0] * x, 0.0)
    elif ti.static(k == 5):
        value, grad = C2[1] * y * z, ti.math.vec3(0.0, C2[1] * z, C2[1] * y)
    elif ti.static(k == 6):
        value = C2[2] * (2.0 * z * z - x * x - y * y)
        grad = ti.math.vec3(-2.0 * C2[2] * x, -2.0 * C2[2] * y, 4.0 * C2[2] * z)
    elif ti.static(k == 7):
        value, grad = C2[3] * x * z, ti.math.vec3(C2[3] * z, 0.0, C2[3] * x)
    elif ti.static(k == 8):
        value = C2[4] * (x * x - y * y)
        grad = ti.math.vec3(2.0 * C2[4] * x, -2.0 * C2[4] * y, 0.0)
    elif ti.static(k == 9):
        value = C3[0] * y * (3.0 * x * x - y * y)
        grad = ti.math.vec3(6.0 * C3[0] * x * y, C3[0] * (3.0 * x * x - 3.0 * y * y), 0.0)
    elif ti.static(k == 10):
        value = C3[1] * x * y * z
        grad = ti.math.vec3(C3[1] * y * z, C3[1] * x * z, C3[1] * x * y)
    elif ti.static(k == 11):
        value = C3[2] * y * (4.0 * z * z - x * x - y * y)
        grad = ti.math.vec3(-2.0 * C3[2] * x * y, C3[2] * (4.0 * z * z - x * x - 3.0 * y * y),
                            8.0 * C3[2] * y * z)
    elif ti.static(k == 12):
        value = C3[3] * z * (2.0 * z * z - 3.0 * x * x - 3.0 * y * y)
        grad = ti.math.vec3(-6.0 * C3[3] * x * z, -6.0 * C3[3] * y * z,
                            C3[3] * (6.0 * z * z - 3.0 * x * x - 3.0 * y * y))
    elif ti.static(k == 13):
        value = C3[4] * x * (4.0 * z * z - x * x - y * y)
        grad = ti.math.vec3(C3[4] * (4.0 * z * z - 3.0 * x * x - y * y), -2.0 * C3[4] * x * y,
                            8.0 * C3[4] * x * z)
    elif ti.static(k == 14):
        value = C3[5] * z * (x * x - y * y)
        grad = ti.math.vec3(2.0 * C3[5] * x * z, -2.0 * C3[5] * y * z, C3[5] * (x * x - y * y))
    else:
        value = C3[6] * x * (x * x - 3.0 * y * y)
        grad = ti.math.vec3(C3[6] * (3.0 * x * x - 3.0 * y * y), -6.0 * C3[6] * x * y, 0.0)
    return value, grad


@ti.func
def sh_to_rgb(coeffs: ti.template(), n, direction, degree: ti.template()):
    """RGB of Gaussian n seen along ``direction`` (any length); coeffs is an (N, B, 3) ndarray."""
    d = direction.normalized()
    rgb = ti.math.vec3(0.5)
    for k in ti.static(range(num_sh_bases(degree))):
        value, _ = _basis_and_grad(d, k)
        rgb += value * ti.math.vec3(coeffs[n, k, 0], coeffs[n, k, 1], coeffs[n, k, 2])
    return ti.max(rgb, 0.0)


@ti.func
def sh_to_rgb_backward(coeffs: ti.template(), v_coeffs: ti.template(), n, direction, v_rgb,
                       degree: ti.template(), accumulate: ti.template()):
    """Add (accumulate) or write dL/dcoeffs into the first (degree+1)^2 rows of v_coeffs[n]; return dL/ddirection."""
    length = direction.norm()
    d = direction / length
    raw = ti.math.vec3(0.5)
    for k in ti.static(range(num_sh_bases(degree))):
        value, _ = _basis_and_grad(d, k)
        raw += value * ti.math.vec3(coeffs[n, k, 0], coeffs[n, k, 1], coeffs[n, k, 2])
    v_raw = ti.select(raw > 0.0, v_rgb, 0.0)  # the clamp at zero passes no gradient
    v_d = ti.math.vec3(0.0)
    for k in ti.static(range(num_sh_bases(degree))):
        value, grad = _basis_and_grad(d, k)
        for ch in ti.static(range(3)):
            if ti.static(accumulate):
                v_coeffs[n, k, ch] += value * v_raw[ch]
            else:
                v_coeffs[n, k, ch] = value * v_raw[ch]
        v_d += grad * (v_raw[0] * coeffs[n, k, 0] + v_raw[1] * coeffs[n, k, 1] + v_raw[2] * coeffs[n, k, 2])
    return (v_d - d * d.dot(v_d)) / length
