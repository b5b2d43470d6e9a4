# Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
"""Optional C++ kernels for the mixer's CPU inference path (``mixer_kernels.cpp``, ``torch.ops.mmseg_vil_cpu``).

Eager PyTorch runs the mixer's elementwise stages as about ten full passes over the tokens per block; these kernels
do them in two, in float32 or float64, the same functions as :mod:`..mixer_ops.reference`:

* ``conv_qkv``: the depthwise conv (kernel rotated for reverse blocks), its bias and SiLU, the block-diagonal q/k/v
  products and their biases (q/k/v written straight into the chunkwise cell's padded layout), and the gate
  pre-activations (the gate weights folded into the projections', as :func:`..mixer_ops.reference.
  fold_gate_weights`), with the up-projection's bias added as the pass reads its output;
* ``gated_output_``: per-head LayerNorm of the cell's output (its rows scaled as they are read), affine, learnable
  skip, SiLU output gate of z (plus its bias), in place on z;

and the chunkwise cell (``cell_``, :mod:`..mlstm.chunkwise_inference`) chunk by chunk, its state carried by the
recurrence, its matrix products BLAS's (``sgemm_`` / ``dgemm_`` as PyTorch's CPU library exports them; where it does
not, ``blas_found()`` is false and the cell's PyTorch form runs); ``cell_gated_output_`` is the cell with
``gated_output_`` as its epilogue (h is not stored). x and z may be the column halves of one up-projection output
(:func:`rows_strided`), read and written in place. Between blocks, ``add_layer_norm_`` adds a block's output, its
down-projection's bias and the residual stream and normalises the sum for the next block, in one pass.

Built just in time on first use with :func:`torch.utils.cpp_extension.load` (a C++ compiler and ninja; about 10 s on
two cores) and cached in the torch extensions directory (``TORCH_EXTENSIONS_DIR``); the build's name carries a hash
of the sources, so an edited source builds anew. With GCC on x86-64 the loops are compiled for the baseline, AVX2 and
AVX-512 and chosen at run time (``MMSEG_VIL_CPU_ISA=baseline|avx2`` caps the choice). Used only where :func:`usable`
holds: on the CPU, float32/float64, no autograd record, not traced, compiled or exported, no dispatch mode active.
Where the build fails (no compiler) one warning says so and the PyTorch path runs. ``MMSEG_VIL_CPU_EXTENSION=0``
turns the kernels off.
"""
import hashlib
import logging
import os
import shutil
import threading
import warnings
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import Tensor

ENV_SWITCH = 'MMSEG_VIL_CPU_EXTENSION'
SOURCES = ('mixer_kernels.cpp', 'mixer_kernels_body.h')
DTYPES = (torch.float32, torch.float64)
_DIRECTORY = Path(__file__).resolve().parent
_lock = threading.Lock()
_state = {'ops': None, 'tried': False}


def enabled() -> bool:
    """Whether the switch allows the kernels (anything but ``0``, ``false``, ``off``, ``no``; on by default)."""
    return os.environ.get(ENV_SWITCH, '1').strip().lower() not in ('0', 'false', 'off', 'no')


def build_name() -> str:
    """The extension's name: a hash of its sources, so that an edited source (the header too) builds anew."""
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((_DIRECTORY / name).read_bytes())
    return f'mmseg_vil_cpu_{digest.hexdigest()[:12]}'


def _build():
    # quiet: the module logs "No CUDA runtime is found" on import where CUDA_HOME exists without a GPU (a CPU build)
    logger = logging.getLogger('torch.utils.cpp_extension')
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    path = os.environ.get('PATH', '')
    if shutil.which('ninja') is None:  # torch runs `ninja` from PATH: the pip package's, where not activated
        try:
            import ninja
            os.environ['PATH'] = os.pathsep.join([ninja.BIN_DIR, path])
        except ImportError:
            pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            cpp_extension.load(name=build_name(), sources=[str(_DIRECTORY / SOURCES[0])],
                               extra_include_paths=[str(_DIRECTORY)], extra_cflags=['-O3', '-fopenmp'],
                               extra_ldflags=['-fopenmp'], is_python_module=False, verbose=False)
    finally:
        os.environ['PATH'] = path
    return torch.ops.mmseg_vil_cpu


def ops():
    """The kernels' ops (``torch.ops.mmseg_vil_cpu``), built on the first call; ``None`` where switched off or where
    the build failed (warned once)."""
    if not enabled():
        return None
    if not _state['tried']:
        with _lock:
            if not _state['tried']:
                try:
                    _state['ops'] = _build()
                except Exception as error:  # noqa: BLE001 (no compiler, no ninja, a failed compile: all fall back)
                    warnings.warn(f'mmseg_vil: the C++ CPU kernels could not be built ({type(error).__name__}: '
                                  f'{str(error).strip()[-500:]}); the mixer runs its PyTorch path. Set {ENV_SWITCH}=0 '
                                  'to skip the build.', RuntimeWarning, stacklevel=2)
                _state['tried'] = True
    return _state['ops']


def usable(*tensors: Optional[Tensor]) -> bool:
    """Whether the kernels may run on ``tensors`` (``None`` skipped): plain CPU tensors of one float32/float64 dtype,
    no autograd record, eager (not traced, compiled or exported, no dispatch mode), switched on and built."""
    if (torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()
            or torch._C._len_torch_dispatch_stack() > 0):  # first: a tracer sees nothing of the rest
        return False
    tensors = [t for t in tensors if t is not None]
    if not tensors or not enabled():
        return False
    dtype = tensors[0].dtype
    if dtype not in DTYPES or any(type(t) not in (Tensor, torch.nn.Parameter) or t.device.type != 'cpu'
                                  or t.dtype != dtype for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return ops() is not None


def rows_strided(t: Tensor) -> bool:
    """Whether ``t (..., N, C)`` has contiguous rows, each ``t.stride(-2)`` elements after the one before across all
    leading dimensions (a contiguous tensor, or one half of a product's columns): the layout the kernels read ``x``
    and write ``z`` in."""
    if t.dim() < 2 or t.stride(-1) != 1 or t.stride(-2) < t.shape[-1]:
        return False
    expected = t.stride(-2) * t.shape[-2]
    for size, stride in zip(reversed(t.shape[:-2]), reversed(t.stride()[:-2])):
        if size > 1 and stride != expected:
            return False
        expected *= size
    return True


def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def conv_qkv_gates(x: Tensor, grid, conv_weight: Tensor, conv_bias: Optional[Tensor], qkv_weight: Tensor,
                   qkv_bias: Optional[Tensor], gate_weight: Tensor, gate_bias: Tensor, num_heads: int, reverse: bool,
                   out: Optional[Tensor] = None, x_bias: Optional[Tensor] = None):
    """:func:`..mixer_ops.reference.conv_qkv_heads` for the 2-D conv and
    :func:`..mixer_ops.reference.folded_gate_preactivations` in one pass over the tokens (check :func:`usable` first):
    ``(x_conv (B, N, E), qkv (3, B, NH, N, DH), gates (B, G, N))``, q/k/v written into ``out`` if given; ``x`` read in
    place where :func:`rows_strided`. ``x_bias``: a bias of ``x`` not yet added (the up-projection's), which the pass
    adds (the conv's input is ``x + x_bias``)."""
    x = x if rows_strided(x) else x.contiguous()
    batch, n, inner = x.shape
    x_conv = x.new_empty(x.shape)
    qkv = x.new_empty(3, batch, num_heads, n, inner // num_heads) if out is None else out
    gates = x.new_empty(batch, len(gate_bias), n)
    ops().conv_qkv(x, _contiguous(x_bias), grid[0], grid[1], conv_weight.contiguous(), _contiguous(conv_bias),
                   qkv_weight.contiguous(), _contiguous(qkv_bias), reverse, gate_weight.contiguous(),
                   gate_bias.contiguous(), x_conv, qkv, gates)
    return x_conv, qkv, gates


def add_layer_norm_(x: Tensor, update: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float,
                    update_bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``update + update_bias + x`` written into ``update`` (a block's output, its down-projection's bias not yet
    added where ``update_bias`` is given), and ``F.layer_norm`` of it (check :func:`usable` first, and that ``x`` and
    ``update`` are contiguous): the next block's norm in the same pass as the residual add."""
    normed = torch.empty_like(x)
    ops().add_layer_norm_(x, update, _contiguous(update_bias), weight.contiguous(), _contiguous(bias), eps, normed)
    return update, normed


def gated_output_(h: Tensor, x_conv: Tensor, z: Tensor, norm_weight: Tensor, norm_bias: Optional[Tensor],
                  skip: Tensor, eps: float, h_scale: Optional[Tensor] = None,
                  z_bias: Optional[Tensor] = None) -> Tensor:
    """:func:`..mixer_ops.reference.gated_output_` in one pass (check :func:`usable` first) of ``h (B, N, NH, DH)``
    (any strides) times ``h_scale (B, N, NH, 1)`` if given: written into ``z`` (:func:`rows_strided`), which is
    returned.
    ``z_bias``: a bias of ``z`` not yet added (the up-projection's), which the pass adds."""
    ops().gated_output_(h if h.stride(-1) == 1 else h.contiguous(), h_scale, x_conv.contiguous(), z,
                        _contiguous(z_bias), norm_weight.contiguous(), _contiguous(norm_bias), skip.contiguous(), eps)
    return z
