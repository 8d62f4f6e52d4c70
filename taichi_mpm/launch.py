"""Calling Taichi kernels on torch tensors without ti.kernel's per-call argument inspection.

A plain ti.kernel call spends about 20 us of Python on every torch-tensor argument (the template
key, device and gradient checks, environment look-ups) before the launch itself: the rasterizer
passes ~65 tensors over the five launches of a forward+backward, an MPM substep ~40 over five, so
host time rivals the work at small and medium sizes. A TorchKernel has Taichi compile the instance
a call needs (on stand-in arrays, see ``_compile``), keeps it, and fills the launch context directly
(~2 us an argument), checking what that instance was specialised on: each tensor's dtype, full
shape rank (element dims included) and element shape, contiguity and device.

Supported parameters: ``ti.types.ndarray`` with a dtype (scalar, vector or matrix) and ndim; int and
float scalars; vector/matrix scalars (``ti.types.vector/matrix``; pass a ti.Vector/ti.Matrix or a
nested sequence); ``ti.template()`` values, which Taichi compiles into the instance, so instances
are kept per tuple of template values. ``TorchKernel(kernel, reverse=True)`` launches Taichi's
reverse-mode ``kernel.grad``: each tensor that requires grad passes its ``.grad`` (same shape, dtype
and device, contiguous) as the adjoint Taichi accumulates into, and instances are also kept per
pattern of which tensors require grad (Taichi specialises on it). Forward launchers pass no
gradient pointers. It relies on Taichi 1.7's launch internals (Kernel.compiled_kernels,
launch contexts; the argument layout of Kernel.launch_kernel: template parameters take no slot,
an ndarray of vector/matrix elements gets its shape without the element dims, a vector/matrix
scalar is set element by element at index (slot, row * m + col)).
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import taichi as ti
import torch
from taichi._lib import core as _ti_core
from taichi.lang import impl
from taichi.types.annotations import template
from taichi.lang.matrix import Matrix, MatrixType
from taichi.types import ndarray_type, primitive_types

_TORCH_DTYPES = {id(ti.f32): torch.float32, id(ti.f64): torch.float64, id(ti.i16): torch.int16,
                 id(ti.i32): torch.int32, id(ti.i64): torch.int64, id(ti.u8): torch.uint8}
_UNSIGNED_IDS = {id(ti.u8), id(ti.u16), id(ti.u32), id(ti.u64)}
SEEN_TENSORS = 64  # tensors an array parameter remembers (see _array_setter)


class TorchKernel:
    """Wraps a ti.kernel (its reverse-mode .grad with reverse=True); call it with the kernel's own
    arguments (torch tensors for ndarrays)."""

    def __init__(self, kernel, reverse: bool = False, compile_config: Optional[Mapping[str, object]] = None,
                 remember: bool = False) -> None:
        # Taichi compile settings changed for this kernel's compile only (see compile_settings)
        self._compile_config = dict(compile_config or {})
        # remember=True: each array parameter remembers the tensors set lately (see _array_setter), for
        # launchers called again and again on the same buffers (the MPM substeps). A renderer's arrays
        # are new every call, where the memory only adds its look-up and entry (raster forward+backward,
        # 48 arrays: host glue 811 -> 943 us a call with it, 2-core CPU, bench/raster.py --host-overhead)
        self._remember = remember
        self._primal = kernel._adjoint if reverse else kernel._primal
        self._reverse = reverse
        self._name = self._primal.func.__name__ + (".grad" if reverse else "")
        self._template_positions: List[int] = []
        self._array_positions: List[int] = []
        # (launch-context slot, argument position, setter(ctx, slot, value)); ctx None only validates
        self._setters: List[Tuple[tuple, int, Callable]] = []
        for position, arg in enumerate(self._primal.arguments):
            anno = arg.annotation
            if isinstance(anno, template):
                self._template_positions.append(position)
                continue
            if isinstance(anno, ndarray_type.NdarrayType):
                self._array_positions.append(position)
            # template parameters take no slot
            self._setters.append(((len(self._setters),), position, self._setter(arg.name, anno)))
        self._num_args = len(self._primal.arguments)
        self._keyed = bool(self._template_positions) or reverse  # else every call has the instance key ()
        self._compiled: Dict[tuple, object] = {}  # instance key -> compiled kernel instance
        self._data: Dict[tuple, tuple] = {}  # instance key -> (Taichi program, its compiled kernel data)
        self._on_cuda = False  # whether the Taichi arch is CUDA, read on the first call

    def _setter(self, name: str, anno) -> Callable:
        if isinstance(anno, ndarray_type.NdarrayType):
            element = anno.dtype
            scalar = element.dtype if isinstance(element, MatrixType) else element
            if id(scalar) not in _TORCH_DTYPES or not anno.ndim:
                raise TypeError(f"{self._name}: parameter {name} ({anno}) needs a dtype and an ndim")
            element_shape = tuple(element.get_shape()) if isinstance(element, MatrixType) else ()
            return self._array_setter(name, _TORCH_DTYPES[id(scalar)], anno.ndim, element_shape)
        if isinstance(anno, MatrixType):
            if id(anno.dtype) not in primitive_types.real_type_ids:
                raise TypeError(f"{self._name}: parameter {name} ({anno}) must have a float dtype")
            return self._matrix_setter(name, tuple(anno.get_shape()))
        if id(anno) in primitive_types.real_type_ids:
            return self._scalar_setter(name, (float, int, np.floating, np.integer), float, "set_arg_float")
        if id(anno) in primitive_types.integer_type_ids:
            method = "set_arg_uint" if id(anno) in _UNSIGNED_IDS else "set_arg_int"
            return self._scalar_setter(name, (int, np.integer), int, method)
        raise TypeError(f"{self._name}: parameter {name} ({anno}) is not an ndarray with dtype and ndim, "
                        f"a scalar, a float vector/matrix or a ti.template()")

    def _scalar_setter(self, name: str, accepted: tuple, convert: type, method: str) -> Callable:
        def set_scalar(ctx, slot, value):
            if not isinstance(value, accepted):
                raise TypeError(f"{self._name}: {name} must be {convert.__name__}, got {type(value).__name__}")
            if ctx is not None:
                getattr(ctx, method)(slot, convert(value))
        return set_scalar

    def _array_setter(self, name: str, dtype: torch.dtype, ndim: int, element_shape: tuple) -> Callable:
        rank = ndim + len(element_shape)
        expected = f"a contiguous {dtype} tensor of {ndim} array dims" + (
            f" followed by element dims {element_shape}" if element_shape else "")
        reverse = self._reverse

        def fail(value):  # the slow path: say what is wrong
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{self._name}: {name} must be {expected}, got {type(value).__name__}")
            if (value.dtype != dtype or value.dim() != rank or tuple(value.shape[ndim:]) != element_shape
                    or not value.is_contiguous()):
                raise ValueError(f"{self._name}: {name} must be {expected}, got shape {tuple(value.shape)} "
                                 f"{value.dtype}{'' if value.is_contiguous() else ' (not contiguous)'}")
            raise ValueError(f"{self._name}: {name} is on {value.device}, the Taichi runtime runs on "
                             f"{'cuda' if self._on_cuda else 'cpu'}")

        # with remember: the tensors set here lately, by id: a weak reference (a launcher must not
        # keep a buffer alive) and the pointer, size and shape the launch took. The same tensor
        # again, unchanged, skips the checks and their attribute reads (~0.9 us of ~2.8 an argument,
        # 2-core CPU): a rollout passes the same buffers and views to every substep's launches.
        seen: Optional[Dict[int, tuple]] = {} if self._remember else None

        def set_array(ctx, slot, value):
            if seen is not None:
                entry = seen.get(id(value))
                if entry is not None:
                    ref, pointer, shape, nbytes, launch_shape = entry
                    if (ref() is value and value.data_ptr() == pointer and value.shape == shape
                            and value.dtype is dtype and value.is_contiguous() and not (reverse and value.requires_grad)):
                        if ctx is not None:
                            ctx.set_arg_external_array_with_shape(slot, pointer, nbytes, launch_shape, 0)
                        return
            # one expression on the hot path (~0.5 us); is_cuda/is_cpu: device.type builds a string
            if not (isinstance(value, torch.Tensor) and value.dtype is dtype and value.dim() == rank
                    and value.is_contiguous() and (value.is_cuda if self._on_cuda else value.is_cpu)
                    and (not element_shape or value.shape[ndim:] == element_shape)):
                fail(value)
            launch_shape = value.shape[:ndim] if element_shape else value.shape
            if seen is not None:
                if len(seen) >= SEEN_TENSORS:  # the dead and the rarely passed go with the rest
                    seen.clear()
                seen[id(value)] = weakref.ref(value), value.data_ptr(), value.shape, value.nbytes, launch_shape
            grad_pointer = 0
            if reverse and value.requires_grad:
                grad = value.grad
                if (grad is None or grad.shape != value.shape or grad.dtype != value.dtype
                        or grad.device != value.device or not grad.is_contiguous()):
                    raise ValueError(f"{self._name}: {name} requires grad, so its .grad must be a contiguous "
                                     f"tensor like it (the adjoint Taichi accumulates into)")
                grad_pointer = grad.data_ptr()
            if ctx is not None:  # Kernel.launch_kernel strips the element dims from the shape
                ctx.set_arg_external_array_with_shape(slot, value.data_ptr(), value.nbytes, launch_shape,
                                                      grad_pointer)
        return set_array

    def _matrix_setter(self, name: str, shape: tuple) -> Callable:
        size = int(np.prod(shape))

        def set_matrix(ctx, slot, value):
            flat = np.asarray(value.to_list() if isinstance(value, Matrix) else value, dtype=np.float64)
            if flat.shape != shape:
                raise ValueError(f"{self._name}: {name} must have shape {shape}, got {flat.shape}")
            if ctx is not None:
                for i, element in enumerate(flat.reshape(size).tolist()):
                    ctx.set_struct_arg_float((*slot, i), element)
        return set_matrix

    def __call__(self, *args) -> None:
        if len(args) != self._num_args:
            raise TypeError(f"{self._name} takes {self._num_args} arguments, got {len(args)}")
        key = ()
        if self._keyed:
            key = tuple(args[p] for p in self._template_positions)
            if self._reverse:  # Taichi compiles one reverse kernel per pattern of arrays needing grad
                key += tuple(bool(getattr(args[p], "requires_grad", False)) for p in self._array_positions)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compile(key, args)
        ctx = compiled.make_launch_context()
        for slot, position, setter in self._setters:  # validates and fills the context
            setter(ctx, slot, args[position])
        prog = impl.get_runtime().prog
        data = self._data.get(key)
        if data is None or data[0] is not prog:  # Taichi looks this up on every launch; keep it
            with compile_settings(self._compile_config):  # the settings are part of the lookup key
                data = self._data[key] = (prog, prog.compile_kernel(prog.config(), prog.get_device_caps(), compiled))
        self._launch(prog, data[1], ctx)

    @staticmethod
    def _launch(prog, compiled_data, ctx) -> None:
        """Taichi's own launch (C++), a function of its own so that bench/host_sections.py can time it
        apart from the argument setting above."""
        prog.launch_kernel(compiled_data, ctx)

    def _compile(self, key: tuple, args: tuple):
        """Validates the arguments, then has Taichi compile the instance they call for, without
        launching it. Taichi compiles on stand-ins (one element per array dim, same dtype, element
        shape, device and requires_grad): its compile context keeps the arguments it was given in a
        reference cycle that only Python's full garbage collection frees, which held a 1M-particle
        rollout's first segment buffers (~0.75 GB of GPU memory) long after the call."""
        self._on_cuda = impl.current_cfg().arch == _ti_core.Arch.cuda
        for slot, position, setter in self._setters:
            setter(None, slot, args[position])
        stand_ins = list(args)
        for position in self._array_positions:
            value, ndim = args[position], self._primal.arguments[position].annotation.ndim
            stand_ins[position] = value.new_zeros((1,) * ndim + tuple(value.shape[ndim:])).requires_grad_(
                self._reverse and value.requires_grad)  # forward launchers pass no gradient pointers
        with compile_settings(self._compile_config):
            compiled = self._primal.compiled_kernels[self._primal.ensure_compiled(*stand_ins)]
        self._compiled[key] = compiled
        return compiled


@contextmanager
def compile_settings(settings: Mapping[str, object]):
    """Taichi's compile config with ``settings`` (CompileConfig attributes) changed inside the block:
    Taichi reads it when a kernel compiles and keys its kernel caches on it."""
    cfg = impl.current_cfg()
    saved = {name: getattr(cfg, name) for name in settings}
    try:
        for name, value in settings.items():
            setattr(cfg, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(cfg, name, value)
