# Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
"""Keep freed memory in the process for CPU inference (glibc ``mallopt``), instead of returning it to the OS.

A forward pass frees and allocates activations of several MiB in every layer. glibc serves blocks above its mmap
threshold with fresh pages and returns freed memory at the top of the heap to the OS, so each layer page-faults its
tensors in again; in a virtual machine a fault costs microseconds per 4 KiB page (ViL-T at 1024 x 1024 on a 2-core
VM: block-diagonal projection 16.0 ms with fresh pages, 5.3 ms with kept ones). Raising both thresholds keeps the
pages mapped, as running under jemalloc or tcmalloc would (PyTorch's CPU performance guide recommends those). The
cost is a resident size that stays at its peak.
"""
import ctypes
import ctypes.util
from typing import Optional

# mallopt parameters (malloc.h) and the largest mmap threshold glibc accepts on 64-bit systems (HEAP_MAX_SIZE / 2)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MAX_MMAP_THRESHOLD = 32 * 1024 * 1024
NEVER_TRIM = 2 ** 31 - 1


def _glibc() -> Optional[ctypes.CDLL]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    except OSError:
        return None
    return libc if hasattr(libc, 'gnu_get_libc_version') and hasattr(libc, 'mallopt') else None


def keep_freed_memory() -> bool:
    """Serve blocks up to 32 MiB from the heap and never trim it; ``False`` (nothing changed) without glibc."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
