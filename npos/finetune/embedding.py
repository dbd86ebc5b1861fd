"""Re-embedding a token store with a tuned tail: cached tokens -> a normal features store.

The new store has the source's rows, labels, ids, validity, failures, class names and text
embeddings; its ``embeddings`` come from the tuned tail and its ``pretrained`` attribute names
the tuned weights (:func:`npos.finetune.tail.tuned_pretrained`), so ``evaluate``, ``score`` and
``train-head`` treat it as the output of a new encoder: comparable with every store re-embedded
by the same tail and with the head trained alongside it, refused next to the original stores.

Writing is chunk-resumable: a chunk's rows are written, then its ``done`` flag; a re-run with
``resume`` encodes only the chunks not yet done.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from npos.device import resolve_device
from npos.encoder import autocast
from npos.finetune.tail import VisionTail
from npos.finetune.tokens import iter_token_blocks
from npos.store import FeatureStore

#: Row-aligned arrays copied from the source store when it has them.
COPIED_ARRAYS = ("labels", "ids", "valid", "error")
#: Source attributes carried over unchanged (the images and how they were labeled and read).
COPIED_ATTRS = ("model", "preprocess", "source", "templates", "seed", "failed")


def embedded_attrs(source: FeatureStore, pretrained: str,
                   finetune: Mapping[str, Any]) -> dict[str, Any]:
    """Attributes of the store re-embedded from ``source``: the source's, with the tuned
    weights' identity as ``pretrained``, no ``token_layer`` (it holds no tokens) and a
    ``finetune`` record (tail, its sha256, layer, source store)."""
    attrs = source.attrs
    return {**{k: attrs[k] for k in COPIED_ATTRS if k in attrs},
            "pretrained": pretrained, "token_layer": None,
            "finetune": {**finetune, "source_store": source.url,
                         "source_pretrained": attrs.get("pretrained")}}


@torch.no_grad()
def embed_store(tail: VisionTail, source: FeatureStore, out: str, *, attrs: Mapping[str, Any],
                batch_size: int = 256, device: str | torch.device = "cpu",
                overwrite: bool = False, resume: bool = False,
                progress: bool | None = None) -> FeatureStore:
    """Run ``tail`` over every valid row of ``source``'s tokens into a new store ``out``.

    Parameters
    ----------
    tail : VisionTail
        On ``device``; switched to eval mode.
    source : FeatureStore
        A complete store with ``tokens`` cut at ``tail.layer`` (checked by the caller).
    out : str
        The new store (local path or fsspec URL).
    attrs : mapping
        Its attributes (see :func:`embedded_attrs`).
    batch_size : int
        Rows per forward pass.
    device : str or torch.device
    overwrite, resume : bool
        As :meth:`FeatureStore.create`: replace an existing store, or fill in the missing
        chunks of one made by the same tail from the same source.
    progress : bool or None
        Progress bar (None: when stderr is a terminal).

    Returns
    -------
    FeatureStore
        The complete new store.
    """
    from tqdm.auto import tqdm

    device = resolve_device(device)
    tail.eval()
    source.readable_rows(complete=True)  # refuse an unfinished source up front
    target = FeatureStore.create(
        out, n_rows=source.n_rows, dim=tail.output_dim, dtype=source.dtype,
        chunk_rows=source.chunk_rows, kind="features", class_names=source.class_names,
        attrs=attrs, overwrite=overwrite, resume=resume)
    has_valid = source.has("valid")
    if has_valid:
        target.add_array("valid", (), "bool", fill_value=True)
    if source.has("error"):
        target.add_array("error", (), np.dtypes.StringDType())
    if source.has("text_embeddings") and not target.has("text_embeddings"):
        # The text tower is untouched by fine-tuning: its class embeddings stay valid.
        target.set_array("text_embeddings", source.read_extra("text_embeddings"))

    missing = target.missing_chunks()
    total = sum(target.chunk_slice(i).stop - target.chunk_slice(i).start for i in missing)
    bar = tqdm(total=total, unit="img", unit_scale=True, desc=f"embedding {target.url}",
               disable=None if progress is None else not progress)
    parts: list[np.ndarray] = []
    with bar:
        for index, rows, tokens in iter_token_blocks(source, missing):
            chunk = target.chunk_slice(index)
            valid = (np.asarray(source.array("valid")[rows], dtype=bool) if has_valid
                     else np.ones(rows.stop - rows.start, dtype=bool))
            emb = np.full((valid.size, target.dim), np.nan, dtype=np.float32)
            keep = np.flatnonzero(valid)
            for start in range(0, keep.size, batch_size):
                idx = keep[start:start + batch_size]
                x = torch.from_numpy(tokens[idx]).to(device, torch.float32)
                with autocast(device, target.dtype):
                    emb[idx] = tail(x).float().cpu().numpy()
            parts.append(emb)
            bar.update(valid.size)
            if rows.stop == chunk.stop:
                arrays = {name: np.asarray(source.array(name)[chunk])
                          for name in COPIED_ARRAYS if source.has(name)}
                target.write_chunk(index, embeddings=np.concatenate(parts).astype(target.dtype),
                                   **arrays)
                parts = []
    return target
