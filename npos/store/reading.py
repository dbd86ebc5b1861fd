"""Reading a :class:`~npos.store.FeatureStore`: readable rows, whole arrays, batches, and
inspection (failed rows, summary, verification) (a mixin of the store class)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from npos.errors import ParameterError, StoreError
from npos.store.chunks import ChunkFiles

class StoreReading(ChunkFiles):
    """The reading and inspection methods of :class:`~npos.store.FeatureStore` (a mixin: it
    uses the store's ``done_mask``, ``read_rows`` and ``require_chunks``)."""

    def readable_rows(self, *, complete: bool = True) -> np.ndarray:
        """Mask (N,) of rows a reader may use: rows of done chunks that are not invalid.

        With ``complete=True`` (the default for every stage) an unfinished store is an error
        rather than a silently smaller dataset.
        """
        done = self.done_mask()
        if complete and not done.all():
            raise StoreError(
                f"store {self.url!r} is incomplete: {int(done.sum())}/{done.size} chunks done "
                "(finish the run that writes it, or check it with 'npos store verify')")
        mask = np.repeat(done, self.chunk_rows)[: self.n_rows]
        if self.has("valid"):
            mask &= self.read_rows("valid").astype(bool)
        return mask

    def read(self, name: str = "embeddings", *, complete: bool = True, dtype: str | None = None,
             as_torch: bool = False):
        """Read the readable rows of a row-aligned array (see :meth:`readable_rows`).

        Returns a numpy array (or a torch tensor with ``as_torch=True``), cast to ``dtype``
        when given.
        """
        mask = self.readable_rows(complete=complete)
        data = self.read_rows(name)[mask]
        return self._convert(data, dtype, as_torch)

    def read_extra(self, name: str, *, dtype: str | None = None, as_torch: bool = False):
        """Read a whole non-row array such as ``text_embeddings``."""
        return self._convert(self.read_rows(name), dtype, as_torch)

    @staticmethod
    def _convert(data: np.ndarray, dtype: str | None, as_torch: bool):
        if dtype is not None:
            data = data.astype(dtype, copy=False)
        if as_torch:
            import torch

            if data.dtype.kind in "OUT":
                raise ParameterError("string arrays cannot be returned as torch tensors")
            return torch.from_numpy(np.ascontiguousarray(data))
        return data

    def iter_batches(self, batch_rows: int, names: Sequence[str] = ("embeddings",), *,
                     complete: bool = True, dtype: str | None = None,
                     as_torch: bool = False) -> Iterator[dict[str, Any]]:
        """Yield dicts of readable rows, ``batch_rows`` stored rows at a time.

        Each dict maps every requested name to its rows, plus ``"row"``: the rows' positions
        in the store. Every readable row appears in exactly one batch, in order. ``dtype``
        applies to floating arrays only.
        """
        if batch_rows < 1:
            raise ParameterError(f"batch_rows must be >= 1; got {batch_rows}")
        mask = self.readable_rows(complete=complete)
        for name in names:  # refuse lost chunk files before the first batch
            self.require_chunks(name)
        for start in range(0, self.n_rows, batch_rows):
            stop = min(start + batch_rows, self.n_rows)
            keep = mask[start:stop]
            if not keep.any():
                continue
            batch: dict[str, Any] = {"row": np.arange(start, stop)[keep]}
            for name in names:
                data = self.read_rows(name, start, stop)[keep]
                cast = dtype if data.dtype.kind == "f" else None
                batch[name] = self._convert(data, cast, as_torch and data.dtype.kind not in "OUT")
            if as_torch:
                import torch

                batch["row"] = torch.from_numpy(batch["row"])
            yield batch

    # ------------------------------------------------------------------ inspection
    def failed_rows(self, *, recompute: bool = False) -> list[dict[str, str]]:
        """Rows (of done chunks) whose input failed, as ``[{"id": ..., "reason": ...}]``: the
        ``failed`` attribute written at the end of a run, or, with ``recompute`` or without
        it, read from the ``valid`` and ``error`` arrays."""
        failed = None if recompute else self.attrs.get("failed")
        if failed is not None:
            return [dict(row) for row in failed]
        if not self.has("valid"):
            return []
        rows = np.flatnonzero(~np.asarray(self.array("valid")[:], dtype=bool)
                              & np.repeat(self.done_mask(), self.chunk_rows)[: self.n_rows])
        ids = np.asarray(self.array("ids")[:])[rows]
        reasons = (np.asarray(self.array("error")[:])[rows] if self.has("error")
                   else [""] * rows.size)
        return [{"id": str(i), "reason": str(r)} for i, r in zip(ids, reasons, strict=True)]

    def info(self) -> dict[str, Any]:
        """A summary: rows, dim, dtype, kind, model, classes, chunks done."""
        attrs = self.attrs
        done = self.done_mask()
        names = self.class_names
        return {
            "url": self.url,
            "kind": self.kind,
            "rows": self.n_rows,
            "dim": self.dim,
            "dtype": self.dtype,
            "model": attrs.get("model"),
            "pretrained": attrs.get("pretrained"),
            "classes": len(names) if names is not None else None,
            "chunks_done": int(done.sum()),
            "chunks_total": int(done.size),
            "arrays": sorted(self._group.array_keys()),
            "failed": len(attrs.get("failed") or []),
            "created": attrs.get("created"),
        }

    def verify(self, *, check_values: bool = True, batch_rows: int = 65536,
               progress: bool = False) -> list[str]:
        """Check every array; return one human-readable line per problem (empty = healthy).

        See :func:`npos.store.verify.find_problems` for what is checked.
        """
        from npos.store.verify import find_problems

        return [p.message for p in find_problems(self, check_values=check_values,
                                                 batch_rows=batch_rows, progress=progress)]

    def damaged_chunks(self, *, check_values: bool = True) -> list[int]:
        """Done chunks with a lost file or bad values in any array: what a re-run repairs."""
        from npos.store.verify import find_problems

        chunks: set[int] = set()
        for problem in find_problems(self, check_values=check_values):
            chunks.update(problem.chunks)
        return sorted(chunks)
