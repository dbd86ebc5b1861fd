"""Run the npos CLI in this process and ``kill -9`` it at a chosen point (a test helper).

Usage: ``python kill_at.py POINT K npos-args...`` where POINT is one of

* ``chunk-after``  — SIGKILL right after the K-th store chunk of this run is done;
* ``chunk-during`` — SIGKILL while writing the K-th chunk: its embeddings rows are written,
  its other arrays and its ``done`` flag are not;
* ``create-after`` — SIGKILL right after the K-th store of this run is created (no chunk done);
* ``epoch-after``  — SIGKILL right after the resumable state of the K-th epoch is saved;
* ``epoch-during`` — SIGKILL when the K-th epoch is finished but before its state is saved.

The process is killed with SIGKILL (no cleanup, no atexit: the writer lock stays behind),
exactly as ``kill -9`` from outside would at that moment. If the run ends before reaching the
point, it exits normally — the test sees exit code 0 instead of -9 and fails.
"""

from __future__ import annotations

import os
import signal
import sys


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install(point: str, k: int) -> None:
    count = [0]
    if point.startswith("chunk"):
        from npos.store.feature_store import FeatureStore

        write_chunk = FeatureStore.write_chunk

        def killing_write_chunk(self, index, **arrays):
            count[0] += 1
            if count[0] == k and point == "chunk-during":
                self._array("embeddings")[self.chunk_slice(index)] = arrays["embeddings"]
                _die()
            write_chunk(self, index, **arrays)
            if count[0] == k:
                _die()

        FeatureStore.write_chunk = killing_write_chunk
    elif point == "create-after":
        from npos.store.feature_store import FeatureStore

        create = FeatureStore.create.__func__

        def killing_create(cls, *args, **kwargs):
            store = create(cls, *args, **kwargs)
            count[0] += 1
            if count[0] == k:
                _die()
            return store

        FeatureStore.create = classmethod(killing_create)
    elif point.startswith("epoch"):
        from npos.train_head import trainer

        save_partial = trainer.save_partial

        def killing_save_partial(*args, **kwargs):
            count[0] += 1
            if count[0] == k and point == "epoch-during":
                _die()
            save_partial(*args, **kwargs)
            if count[0] == k:
                _die()

        trainer.save_partial = killing_save_partial
    else:
        raise SystemExit(f"unknown kill point {point!r}")


def main() -> None:
    point, k, *args = sys.argv[1:]
    _install(point, int(k))
    from npos.cli import cli

    cli.main(args, prog_name="npos")


if __name__ == "__main__":
    main()
