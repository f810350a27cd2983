"""glibc heap settings for CPU training: keep freed activation memory instead of handing it back to the kernel.

A training step allocates and frees the same activation and gradient buffers every step. glibc's defaults serve
large buffers (above a moving threshold, always above 32 MiB) with fresh ``mmap`` pages and give free heap memory
back to the kernel (the main heap's top above the trim threshold, the OpenMP threads' heaps eagerly), so each step
re-faults its memory page by page: 17,500–35,000 minor faults per step for timm.task's embedded step, 800,000 for its
224-px step with RegNetY-160 (3.2 GB of pages zeroed per step; README "Scale and speed"). :func:`tune_malloc` turns
glibc's use of ``mmap`` for single allocations off and trims only above 1 GiB, so the step reuses its own pages
(≤ ~1,000 faults per step in both; the 224-px step 1.81× faster). The cost: the process keeps its peak heap until it
exits. Intel's ``torch.backends.xeon.run_cpu`` gets a similar effect by preloading jemalloc or tcmalloc; this needs
no extra library.
"""
from __future__ import annotations

import ctypes
import platform

__all__ = ['tune_malloc', 'TRIM_THRESHOLD']

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
TRIM_THRESHOLD = 2 ** 30


def tune_malloc() -> bool:
    """Serve every allocation from the heap (``M_MMAP_MAX`` 0) and trim it only above 1 GiB free (``mallopt``).

    Affects later allocations of this process and of the processes it forks (data loader workers); glibc still
    falls back to ``mmap`` where the heap cannot grow. Returns False, changing nothing, where the C library is not
    glibc (macOS, Windows, musl).
    """
    if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
