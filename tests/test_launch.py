"""taichi_mpm.launch.TorchKernel: same results as a plain Taichi call (bit for bit: the same compiled
kernel runs), clear errors before any launch; on the device the runtime picked."""
import pytest
import taichi as ti
import torch

from taichi_mpm.launch import TorchKernel

vec3 = ti.types.vector(3, ti.f32)
mat3 = ti.types.matrix(3, 3, ti.f32)
N = 37


@ti.kernel
def mix(x: ti.types.ndarray(dtype=vec3, ndim=2), A: ti.types.ndarray(dtype=mat3, ndim=1),
        w: ti.types.ndarray(dtype=ti.f32, ndim=1), offset: vec3, M: mat3, scale: ti.f32, row: ti.i32,
        repeats: ti.template(), out: ti.types.ndarray(dtype=vec3, ndim=1)):
    # the template parameter sits before an ndarray: it must take no launch-context slot
    for p in range(out.shape[0]):
        acc = offset
        for _ in ti.static(range(repeats)):
            acc = M @ acc + scale * w[p] * (A[p] @ x[row, p])
        out[p] = acc


def random_args(seed: int, repeats: int, dev: torch.device):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((2, N, 3), generator=g)
    A = torch.randn((N, 3, 3), generator=g)
    w = torch.rand(N, generator=g)
    offset = ti.Vector(torch.randn(3, generator=g).tolist(), ti.f32)
    M = ti.Matrix(torch.randn((3, 3), generator=g).tolist(), ti.f32)
    return [x.to(dev), A.to(dev), w.to(dev), offset, M, 0.7, seed % 2, repeats, torch.zeros((N, 3), device=dev)]


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "remember"])
def wrapped(ti_arch, request):
    return TorchKernel(mix, remember=request.param)


@pytest.mark.parametrize("repeats", [1, 2])
def test_matches_plain_taichi_call(wrapped, device, repeats):
    for seed in range(3):  # the first call compiles the instance too
        args = random_args(seed, repeats, device)
        expected = args[-1].clone()
        mix(*args[:-1], expected)
        wrapped(*args)
        assert torch.equal(args[-1], expected)
        assert args[-1].abs().sum() > 0


def bad_inputs(dev):
    args = random_args(5, 1, dev)
    x = args[0]
    return {
        "dtype": (0, x.double(), "float32"),
        "rank": (0, x[0], "2 array dims"),
        "element shape": (1, torch.zeros((N, 3, 2), device=x.device), r"element dims \(3, 3\)"),
        "not contiguous": (0, x.transpose(0, 1).contiguous().transpose(0, 1), "not contiguous"),
        "device": (2, torch.zeros(N, device="meta"), "meta"),
        "not a tensor": (2, x.cpu().numpy(), "ndarray"),
        "vector length": (3, [1.0, 2.0], r"shape \(3,\)"),
        "scalar type": (6, 1.5, "int"),
    }


@pytest.mark.parametrize("compiled", [False, True], ids=["first call", "compiled"])
@pytest.mark.parametrize("case", ["dtype", "rank", "element shape", "not contiguous", "device", "not a tensor",
                                  "vector length", "scalar type"])
def test_bad_input_raises_before_launch(wrapped, device, case, compiled):
    kernel = wrapped if compiled else TorchKernel(mix)  # a fresh wrapper checks before Taichi compiles
    if compiled:
        wrapped(*random_args(0, 1, device))
    position, value, message = bad_inputs(device)[case]
    args = random_args(5, 1, device)
    args[position] = value
    with pytest.raises((ValueError, TypeError), match=message):
        kernel(*args)
    assert args[-1].abs().sum() == 0  # nothing ran


@pytest.mark.parametrize("change", ["values", "resized", "data swapped", "strided in place", "other dtype"])
def test_same_tensor_changed_in_place_is_taken_again(wrapped, device, change):
    """A launcher with remember=True keeps the last tensors of each argument to skip their checks:
    the same object, changed in place between two calls, must be read (or refused) as it is now."""
    args = random_args(3, 1, device)
    wrapped(*args)
    x, w = args[0], args[2]
    if change == "values":
        x.mul_(2.0)
    elif change == "resized":  # same object, new storage and shape
        w.resize_(N + 5).normal_()
    elif change == "data swapped":  # same object and shape, another storage
        w.data = torch.rand(N, device=device) + 3.0
    elif change == "strided in place":  # same object, storage pointer and shape; strides changed
        args[2] = torch.rand(2 * N, device=device)[:N]
        wrapped(*args)
        args[2].as_strided_((N,), (2,))
        with pytest.raises(ValueError, match="not contiguous"):
            wrapped(*args)
        return
    elif change == "other dtype":  # same storage and shape
        w.data = w.data.view(torch.int32)
        with pytest.raises(ValueError, match="float32"):
            wrapped(*args)
        return
    out = args[-1]
    out.zero_()
    expected = torch.zeros_like(out)
    mix(*args[:-1], expected) if change != "resized" else mix(x, args[1], w[:N].contiguous(), *args[3:-1], expected)
    wrapped(*args)
    assert torch.equal(out, expected)


def test_wrong_argument_count(wrapped, device):
    with pytest.raises(TypeError, match="takes 9 arguments"):
        wrapped(*random_args(0, 1, device)[:-1])


def grad_args(seed: int, repeats: int, dev: torch.device, needs=("x", "A", "w")):
    """random_args as leaves whose .grad holds the adjoint Taichi accumulates into (x, A, w as
    named in ``needs``), with a random adjoint on ``out``."""
    args = random_args(seed, repeats, dev)
    g = torch.Generator().manual_seed(100 + seed)
    for i, name in ((0, "x"), (1, "A"), (2, "w")):
        if name in needs:
            args[i] = args[i].requires_grad_()
            args[i].grad = torch.zeros_like(args[i])
    out = args[-1].requires_grad_()
    out.grad = torch.randn(out.shape, generator=g).to(dev)
    return args


def test_reverse_launcher_matches_taichi_grad(device):
    """TorchKernel(kernel, reverse=True) gives the adjoints of kernel.grad bit for bit, on every
    call (the fast path too) and for each pattern of arrays needing grad, one launcher serving both
    (Taichi compiles one reverse kernel per pattern). Shown to catch: the gradient pointer left at
    0 (a crash or zero adjoints), and instances keyed on template values alone (the all-arrays call
    reusing the A-only instance leaves x's and w's adjoints at zero)."""
    reverse = TorchKernel(mix, reverse=True)
    for needs in (("A",), ("x", "A", "w")):
        for seed in range(3):
            ours, theirs = grad_args(seed, 2, device, needs), grad_args(seed, 2, device, needs)
            mix.grad(*theirs)
            reverse(*ours)
            for i in range(3):
                assert (ours[i].grad is None) == (theirs[i].grad is None)
                if theirs[i].grad is not None:
                    assert ours[i].grad.abs().sum() > 0 and torch.equal(ours[i].grad, theirs[i].grad), (needs, i)


def test_reverse_launcher_needs_a_matching_grad(device):
    reverse = TorchKernel(mix, reverse=True)
    args = grad_args(7, 1, device)
    args[1].grad = None
    with pytest.raises(ValueError, match=r"A requires grad, so its \.grad must be"):
        reverse(*args)


def test_forward_launcher_leaves_grad_alone(device):
    """A forward launch passes no gradient pointers, its first (compiling) call included: inputs
    that require grad get no .grad (a plain Taichi call would give them a zero one)."""
    args = random_args(3, 1, device)
    args[0] = args[0].requires_grad_()
    TorchKernel(mix)(*args)
    assert args[0].grad is None and args[-1].abs().sum() > 0


def test_compile_config_applies_to_its_kernel_only(device):
    """A launcher's compile_config (the MPM substeps compile without Taichi's CFG pass) holds while
    its kernel compiles -- the first call and the compiled-kernel lookup of later calls, which Taichi
    keys on the settings -- and Taichi's own settings are back afterwards, for the kernels that
    need them (some render kernels abort Taichi's code generation without the CFG pass)."""
    from taichi.lang import impl

    @ti.kernel
    def copy(src: ti.types.ndarray(dtype=ti.f32, ndim=1), dst: ti.types.ndarray(dtype=ti.f32, ndim=1)):
        for i in range(src.shape[0]):
            dst[i] = src[i]

    launcher = TorchKernel(copy, compile_config={"cfg_optimization": False})
    seen = []
    compile_instance = launcher._primal.ensure_compiled  # Taichi's compile of the instance

    def recording(*args):
        seen.append(impl.current_cfg().cfg_optimization)
        return compile_instance(*args)

    launcher._primal.ensure_compiled = recording
    before = impl.current_cfg().cfg_optimization
    src, dst = torch.arange(5.0, device=device), torch.zeros(5, device=device)
    for _ in range(2):
        launcher(src, dst)
        assert impl.current_cfg().cfg_optimization == before
    assert torch.equal(dst, src)
    assert seen == [False]  # compiled under the launcher's settings, once
    with pytest.raises(ValueError):
        launcher(src.double(), dst)  # a failing call leaves the settings alone too
    assert impl.current_cfg().cfg_optimization == before


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_compiling_call_keeps_no_reference_to_its_arguments(device, reverse):
    """Taichi's compile context holds the arguments it compiles on in a reference cycle, which only
    Python's full garbage collection frees; the launcher compiles on stand-ins, so the caller's
    tensors go as soon as the caller drops them (a 1M-particle rollout's first segment kept ~0.75 GB
    of GPU memory allocated otherwise)."""
    import gc

    @ti.kernel
    def halve(src: ti.types.ndarray(dtype=vec3, ndim=1), dst: ti.types.ndarray(dtype=vec3, ndim=1)):
        for i in range(src.shape[0]):
            dst[i] = 0.5 * src[i]

    src = torch.arange(12.0, device=device).reshape(4, 3)
    dst = torch.zeros_like(src)
    if reverse:
        src.requires_grad_().grad = torch.zeros_like(src)
        dst.requires_grad_().grad = torch.ones_like(dst)
    gc.disable()
    try:
        TorchKernel(halve, reverse=reverse)(src, dst)
        assert torch.equal(src.grad, torch.full_like(src, 0.5)) if reverse else torch.equal(dst, 0.5 * src)
        memory = {src.data_ptr(), dst.data_ptr()}
        del src, dst
        alive = [o for o in gc.get_objects() if type(o) is torch.Tensor and o.data_ptr() in memory]
        assert not alive  # any tensor, views included: the memory itself is still held
    finally:
        gc.enable()
