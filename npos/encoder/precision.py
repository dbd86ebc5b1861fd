"""The autocast policy of encoder inference: which 16-bit format (if any) loses least for the
dtype the results are stored in.

Mantissa bits: float32 23, float16 10, bfloat16 7 (relative rounding error 2^-24, 2^-11,
2^-8). Exponent range: float16 ends at 65504, bfloat16 has float32's range.

* **float16 store** (the default for embeddings; tokens are always float16): **fp16
  autocast**. The store keeps 10 mantissa bits; bf16 compute would round every matmul input
  to 7, an error ~8x larger than the store's own rounding, that the store then faithfully
  keeps. fp16 compute matches the store's precision, and its range is the store's range:
  values the store can hold, fp16 can hold. (CLIP ViTs are routinely run in fp16; OpenAI's
  were trained in it.)
* **float32 store**: **no autocast** (plain float32). Asking for the store twice the size is
  asking for precision; any 16-bit compute would discard what the extra bytes keep. It costs
  GPU throughput, which the float16 default does not.
* **no store** (``store_dtype=None``: a caller that only needs the embeddings, e.g. a
  benchmark): bf16 where the GPU supports it (float32's range, nothing to match), else fp16.
* **CPU**: never autocast, so CPU results are plain float32 (and reproducible in tests).
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from npos.validation import check_choice

STORE_DTYPES = ("float16", "float32")


def _dtype_name(dtype: Any) -> Any:
    """``"float16"`` for "float16", np.float16, np.dtype("float16") or torch.float16."""
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    try:
        return np.dtype(dtype).name
    except TypeError:
        return dtype


def autocast_dtype(device: torch.device | str, store_dtype: Any = None) -> torch.dtype | None:
    """The autocast dtype for encoding on ``device`` into a store of ``store_dtype``.

    Parameters
    ----------
    device : torch.device or str
    store_dtype : {"float16", "float32"}, numpy or torch dtype, or None
        What the results are written as; None when they are not stored.

    Returns
    -------
    torch.dtype or None
        ``torch.float16`` for a float16 store on CUDA, None (no autocast: float32) for a
        float32 store or on the CPU, bf16 (fp16 where unsupported) on CUDA without a store.
        See the module docstring for why.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    if store_dtype is None:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    name = _dtype_name(store_dtype)
    check_choice("store_dtype", name, STORE_DTYPES)
    return torch.float16 if name == "float16" else None


def autocast(device: torch.device | str,
             store_dtype: Any = None) -> contextlib.AbstractContextManager:
    """Mixed precision for encoder inference per :func:`autocast_dtype` (a no-op context
    when it says no autocast)."""
    dtype = autocast_dtype(device, store_dtype)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
