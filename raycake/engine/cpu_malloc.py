"""Keep freed memory in glibc's heap, so a CPU engine's per-step temporaries do not page-fault.

A CPU step allocates and frees tensors of hundreds of KB to a few MB (activations of a prefill
chunk, logits). glibc serves blocks above its mmap threshold (128 KiB at first) with fresh
``mmap`` pages and unmaps them on free, so every such tensor faults in every page on first
touch, every step; and memory freed at the top of the heap is trimmed back to the OS, to be
faulted in again. On the 2-core VM this cost more than the arithmetic: one bf16 RMSNorm over
2,048 x 256 took 1.4 ms, 0.44 ms with the thresholds below; a 32-request prefill of 4,096
tokens of the embedded model 190-230 ms, 60-63 ms with them.

vLLM's CPU backend gets the same effect by preloading tcmalloc into its engine process. Here
it is ``mallopt`` on glibc's own allocator, from inside the process (no ``LD_PRELOAD``):
allocations up to ``MMAP_THRESHOLD`` come from the heap and freed memory stays there for the
next step. The cost is that the process keeps its peak heap instead of returning it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import platform

logger = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap; glibc caps the threshold at 32 MiB on 64-bit.
MMAP_THRESHOLD = 32 * 1024 * 1024
# Free memory at the top of the heap is kept up to this much before it is returned.
TRIM_THRESHOLD = 1 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process (once); False where the C library
    is not glibc or refuses, and then nothing changed."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # mallopt returns 1 on success, 0 on error.
    done = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    done = done and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not done:
        logger.warning("mallopt refused the thresholds: CPU steps may page-fault on temporaries")
    return done
