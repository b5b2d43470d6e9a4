"""Bounds checking for Triton kernels run by the interpreter (``TRITON_INTERPRET=1``).

Why: under the interpreter a kernel reads and writes host memory through raw addresses, so an access past a tensor
lands in whatever the allocator put next to it. A load returns garbage that a mask or a zero weight may hide, a
store silently corrupts a neighbour, and the tests still pass, while the same kernel on a GPU stops with "an illegal
memory access" (or, inside the caching allocator's segments, corrupts another tensor). :func:`checked_accesses`
makes the interpreter fail at the first such access instead: every address that a load, store or atomic touches with
its mask on must lie, with its whole element, inside the span of one tensor argument of that kernel launch (from its
first to one past its last addressable element, through its strides: a view may not reach the rest of its storage),
and one access (one ``tl.load``/``tl.store`` of a tile) may not straddle two arguments. An access that lands wholly
inside another argument goes unnoticed (the interpreter keeps no pointer provenance); on a GPU such an access usually
does not fault either, but a CPU test can only catch it through the wrong result.

It also holds ``tl.dot`` operands to at least 16 in every dimension, where the interpreter takes any size, so that
CPU tests catch a tile that would not compile on the GPU's Triton 3.6 (benchmarks/RESULTS.md, 2026-12-04).

The checks wrap the interpreter's own entry points (``GridExecutor._init_args_hst``, which moves a launch's arguments
to the host, and the ``InterpreterBuilder`` methods through which every load, store and atomic is dereferenced), so
they depend on Triton's interpreter internals: ``test_mlstm_fused_chunkwise.py`` shows on deliberate mutations that
they still catch what they are meant to.
"""
import os
import sys
from contextlib import contextmanager
from typing import Iterator, List, NamedTuple

import numpy as np
import torch
from triton.runtime import interpreter

MIN_DOT_SIZE = (16, 16, 16)  # (M, N, K)


class OutOfBoundsAccess(AssertionError):
    """A load, store or atomic whose masked-on addresses do not all lie inside one tensor argument of the launch."""


class Span(NamedTuple):
    name: str
    start: int
    end: int  # one past the last byte


def tensor_span(name: str, tensor: torch.Tensor) -> Span:
    """Bytes a tensor (view) can address through its sizes and strides; empty for a tensor without elements."""
    start = tensor.data_ptr()
    if tensor.numel() == 0:
        return Span(name, start, start)
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return Span(name, start, start + (last + 1) * tensor.element_size())


class _Launch:
    """The kernel launch that runs now: its name and the spans of its tensor arguments."""
    checking = False
    kernel = ''
    spans: List[Span] = []


def _record_launch(init_args_hst):
    def wrapper(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args_hst(self, args_dev, kwargs)
        named = [*zip(self.arg_names, args_hst), *kwargs_hst.items()]
        _Launch.kernel = self.fn.__name__
        _Launch.spans = [tensor_span(f'{self.fn.__name__}.{name}', interpreter._unwrap_tensor(arg))
                         for name, arg in named if hasattr(arg, 'data_ptr')]
        return args_hst, kwargs_hst
    return wrapper


def _kernel_lines() -> str:
    """``file:line function`` of the kernel frames on the stack, innermost first (the interpreter runs the kernels'
    rewritten source under their own file names and line numbers)."""
    triton_dir = os.path.dirname(os.path.dirname(interpreter.__file__))
    lines = []
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if not path.startswith(triton_dir) and path != __file__:
            lines.append(f'{os.path.relpath(path)}:{frame.f_lineno} {frame.f_code.co_name}')
            if frame.f_code.co_name == _Launch.kernel:
                break
        frame = frame.f_back
    return ' <- '.join(lines)


def _check(kind: str, ptrs, mask) -> None:
    """All masked-on addresses of one access, each with its whole element, inside the span of one argument."""
    mask = np.asarray(mask).astype(bool)  # the interpreter's masks may be int32
    addresses = np.broadcast_to(ptrs.data, np.broadcast_shapes(ptrs.data.shape, mask.shape))
    addresses = addresses[np.broadcast_to(mask, addresses.shape)].astype(np.int64)
    if addresses.size == 0:
        return
    element = ptrs.get_element_ty().primitive_bitwidth // 8
    low, high = int(addresses.min()), int(addresses.max()) + element
    if any(span.start <= low and high <= span.end for span in _Launch.spans):
        return
    if not _Launch.spans:
        raise OutOfBoundsAccess(f'{kind} in {_Launch.kernel}, a launch without tensor arguments')
    # Report against the argument the access starts in, or the one nearest to it.
    home = min(_Launch.spans, key=lambda span: 0 if span.start <= low < span.end else
               min(abs(low - span.start), abs(low - span.end)))
    outside = addresses[(addresses < home.start) | (addresses + element > home.end)]
    raise OutOfBoundsAccess(
        f'{kind} of {outside.size} of {addresses.size} masked-on elements outside {home.name} '
        f'({(home.end - home.start) // element} elements), e.g. its element {(int(outside[0]) - home.start) // element}'
        f', at {_kernel_lines()}')


def _checked_builder_methods(builder) -> dict:
    """Wrappers of the builder methods that dereference pointer tensors (loads and stores without a mask and the
    tensor-descriptor ones call the masked ones)."""
    load, store = builder.create_masked_load, builder.create_masked_store
    rmw, cas = builder.create_atomic_rmw, builder.create_atomic_cas

    def create_masked_load(ptrs, mask, *args, **kwargs):
        _check('load', ptrs, mask.data)
        return load(ptrs, mask, *args, **kwargs)

    def create_masked_store(ptrs, value, mask, *args, **kwargs):
        _check('store', ptrs, mask.data)
        return store(ptrs, value, mask, *args, **kwargs)

    def create_atomic_rmw(op, ptr, val, mask, *args, **kwargs):
        _check('atomic', ptr, mask.data)
        return rmw(op, ptr, val, mask, *args, **kwargs)

    def create_atomic_cas(ptr, cmp, val, *args, **kwargs):
        _check('atomic', ptr, True)
        return cas(ptr, cmp, val, *args, **kwargs)

    return dict(create_masked_load=create_masked_load, create_masked_store=create_masked_store,
                create_atomic_rmw=create_atomic_rmw, create_atomic_cas=create_atomic_cas)


@contextmanager
def checked_accesses() -> Iterator[None]:
    """Interpreted kernels launched inside raise :class:`OutOfBoundsAccess` at their first access outside their
    tensor arguments, and ``tl.dot`` asserts operand sizes of at least :data:`MIN_DOT_SIZE`. Nested uses check
    once."""
    if _Launch.checking:
        yield
        return
    builder = interpreter.interpreter_builder
    executor = interpreter.GridExecutor
    init_args_hst = executor._init_args_hst
    min_dot_size = builder.codegen_fns['min_dot_size']
    methods = _checked_builder_methods(builder)
    executor._init_args_hst = _record_launch(init_args_hst)
    builder.codegen_fns['min_dot_size'] = lambda lhs, rhs: MIN_DOT_SIZE
    for name, method in methods.items():
        setattr(builder, name, method)
    _Launch.checking = True
    try:
        yield
    finally:
        _Launch.checking = False
        executor._init_args_hst = init_args_hst
        builder.codegen_fns['min_dot_size'] = min_dot_size
        for name in methods:
            delattr(builder, name)
        _Launch.kernel, _Launch.spans = '', []
