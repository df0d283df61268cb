"""Triton kernels, each with a torch reference of the same signature and a dispatcher.

``launchable`` checks that a kernel can run on its input tensors: compiled on CUDA, or for CPU
tensors in Triton's interpreter, the only way Triton runs on a CPU. NOTE: TRITON_INTERPRET=1
must be set before ``triton`` is first imported (triton.language's own helpers are decorated
then), so tests of the kernels on CPU run in a subprocess that sets it.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # Triton is Linux-only; the torch references run without it

    class _NoTriton:
        """Enough of ``triton`` and ``triton.language`` for kernel modules to import."""

        constexpr = Any

        @staticmethod
        def jit(fn):
            return fn

    triton = tl = _NoTriton()  # type: ignore[assignment]
    HAS_TRITON = False


def interpreter_active() -> bool:
    """Whether Triton kernels in this process run in the interpreter (and so on CPU tensors)."""
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


def launchable(kernel: Any, like: torch.Tensor) -> Any:
    """``kernel``, checked to be runnable on ``like``'s device."""
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed: use backend='torch'")
    if not like.is_cuda and not interpreter_active():
        raise RuntimeError(
            f"Triton runs kernels on {like.device} tensors only in its interpreter: set "
            "TRITON_INTERPRET=1 before triton is first imported, or use backend='torch'"
        )
    return kernel
