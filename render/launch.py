"""Calling Taichi kernels on torch tensors without ti.kernel's per-call argument inspection.

A plain ti.kernel call spends about 20 us of Python on every torch-tensor argument (the template
key, device and gradient checks, environment look-ups) before the launch itself; the rasterizer
passes ~65 tensors over the five launches of a forward+backward, about 1 ms of host time at any
scene size. A TorchKernel makes its first call through Taichi (compilation and every check), keeps
the compiled instance, and afterwards fills the launch context directly (~2 us an argument),
checking only what that instance was specialised on: each tensor's dtype and dimension count, and
contiguity. It relies on Taichi 1.7's launch internals (Kernel.compiled_kernels, launch contexts).
"""
from __future__ import annotations

import taichi as ti
import torch
from taichi.lang import impl
from taichi.types import ndarray_type, primitive_types

_TORCH_DTYPES = {id(ti.f32): torch.float32, id(ti.f64): torch.float64, id(ti.i16): torch.int16,
                 id(ti.i32): torch.int32, id(ti.i64): torch.int64, id(ti.u8): torch.uint8}


class TorchKernel:
    """Wraps a ti.kernel whose parameters are scalar ndarrays (dtype and ndim given) and ints/floats."""

    def __init__(self, kernel):
        self._kernel = kernel
        self._primal = kernel._primal
        self._params = []  # per parameter: (name, torch dtype, ndim) for arrays, (name, int | float) for scalars
        for arg in self._primal.arguments:
            anno = arg.annotation
            if isinstance(anno, ndarray_type.NdarrayType) and id(anno.dtype) in _TORCH_DTYPES and anno.ndim:
                self._params.append((arg.name, _TORCH_DTYPES[id(anno.dtype)], anno.ndim))
            elif id(anno) in primitive_types.real_type_ids:
                self._params.append((arg.name, float))
            elif id(anno) in primitive_types.integer_type_ids:
                self._params.append((arg.name, int))
            else:
                raise TypeError(f"{self._primal.func.__name__}: parameter {arg.name} ({anno}) is not a scalar "
                                f"ndarray with dtype and ndim, an int or a float")
        self._compiled = None

    def __call__(self, *args) -> None:
        if self._compiled is None:
            self._kernel(*args)  # compiles, checks every argument
            self._compiled = self._primal.compiled_kernels[self._primal.ensure_compiled(*args)]
            return
        if len(args) != len(self._params):
            raise TypeError(f"{self._primal.func.__name__} takes {len(self._params)} arguments, got {len(args)}")
        ctx = self._compiled.make_launch_context()
        for i, (param, value) in enumerate(zip(self._params, args)):
            if len(param) == 3:
                if value.dtype != param[1] or value.dim() != param[2] or not value.is_contiguous():
                    raise ValueError(f"{self._primal.func.__name__}: {param[0]} must be a contiguous {param[2]}-d "
                                     f"{param[1]} tensor, got {tuple(value.shape)} {value.dtype}")
                ctx.set_arg_external_array_with_shape((i,), value.data_ptr(), value.nbytes, value.shape, 0)
            elif param[1] is float:
                ctx.set_arg_float((i,), float(value))
            else:
                ctx.set_arg_int((i,), int(value))
        prog = impl.get_runtime().prog
        prog.launch_kernel(prog.compile_kernel(prog.config(), prog.get_device_caps(), self._compiled), ctx)
