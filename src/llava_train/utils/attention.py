"""Attention kernel selection (PyTorch SDPA backends) for training and the bench."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def sdpa_backends(names: tuple[str, ...] | list[str]) -> Iterator[None]:
    """Restrict PyTorch SDPA to the named backends on CUDA (`flash`, `efficient`, `cudnn`, `math`); no-op otherwise."""
    if not names or not torch.cuda.is_available():
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    table = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
    unknown = [n for n in names if n not in table]
    if unknown:
        raise KeyError(f"unknown SDPA backend(s) {unknown}; valid: {', '.join(table)}")
    with sdpa_kernel([table[n] for n in names]):
        yield
