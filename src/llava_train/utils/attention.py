"""Attention kernel selection (PyTorch SDPA backends) for training and the bench."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.nn.attention import SDPBackend

# `perf.sdpa_backends` names -> PyTorch's SDPA backends.
SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


@contextlib.contextmanager
def sdpa_backends(names: tuple[str, ...] | list[str]) -> Iterator[None]:
    """Restrict PyTorch SDPA to the named backends on CUDA (`flash`, `efficient`, `cudnn`, `math`); no-op otherwise."""
    if not names or not torch.cuda.is_available():
        yield
        return
    from torch.nn.attention import sdpa_kernel

    unknown = [n for n in names if n not in SDPA_BACKENDS]
    if unknown:
        raise KeyError(f"unknown SDPA backend(s) {unknown}; valid: {', '.join(SDPA_BACKENDS)}")
    with sdpa_kernel([SDPA_BACKENDS[n] for n in names]):
        yield
