"""k-nearest neighbours of L2-normalized vectors: one backend registry and one ``auto`` policy,
shared by the synthesis engine (:mod:`npos.synthesize`), the ``knn`` score
(:mod:`npos.evaluate`) and the benchmarks.

Metric: Euclidean distance between **L2-normalized** vectors (not squared), ascending; bank
and queries are normalized inside, so raw embeddings can be passed.
:meth:`KnnIndex.search` returns ``(D, I)`` of shape (n_queries, k), numpy in -> numpy out,
torch in -> torch out.

>>> from npos.knn import KnnIndex
>>> index = KnnIndex("auto").fit(bank)             # (N, D) numpy or torch
>>> dist, ids = index.search(queries, k=10)
>>> d_k = index.kth_distance(bank, 400, exclude_self=True)

**Backends** (the registry maps a name to a :class:`~npos.knn.backends.KnnBackend` class):

* ``torch``: exact; row blocks of ``queries @ bank.T`` (bounded memory) then top-k, or an
  in-place k-th-value select (:mod:`npos.knn.kth`). CPU or GPU (the bank's device).
* ``faiss-flat``: exact ``IndexFlatL2``.
* ``faiss-ivf``: approximate ``IndexIVFFlat`` (:mod:`npos.knn.ivf`): ``nlist`` from
  :func:`~npos.knn.ivf.ivf_nlist`, nprobe tuned per k to a target recall. A
  :class:`~npos.knn.ivf.KnnCache` owned by the caller keeps the trained lists and tuned nprobe
  across fits, so repeated synthesis calls train and tune once.

**One persisted index per store** (:mod:`npos.knn.store_index`, ``npos index build``): an
IVF index over all valid rows of a feature store, written beside it with the store's
fingerprint and a content stamp, nprobe tuned on held-out rows; :class:`StoreIndex` opens,
checks and searches it (store rows as ids).

Adding a backend is one class and one registry line (see ``docs/extending.md``):
subclass :class:`~npos.knn.backends.KnnBackend` and call :func:`register_backend` (or add a
``"name": "module:Class"`` line to ``_REGISTRY`` for a backend shipped with npos).

**The one ``auto`` policy** (:func:`resolve_knn_backend`, used by :class:`KnnIndex` and by
the synthesis engine for each class bank):

* ``torch`` for banks up to :data:`AUTO_TORCH_MAX` (20k) points, when faiss is missing, or
  for banks on a GPU when faiss has no GPU support;
* ``faiss-flat`` (exact) up to :data:`AUTO_EXACT_MAX` (1M) points;
* ``faiss-ivf`` (approximate) beyond.

Why: synthesis banks are per class and small (the paper: Q = 1000 with K = 400). Measured
on a 2-core Xeon (D = 512, ``kth_distance(bank, k, exclude_self=True)``, fit included):
Q = 1000, K = 400: torch 0.23 s, faiss-flat 0.47 s, faiss-ivf 1.15 s; Q = 5000, K = 400:
1.25 / 1.19 / 5.4 s; Q = 20000, K = 50: 10.5 / 7.5 / 5.1 s. IVF only pays once the bank
is large *and* K small against the list sizes (a K of hundreds forces nprobe towards all
lists, and every fit trains and tunes). Exact search is affordable to a million points
(a KNN score bank); beyond that IVF is the only option that scales. The engine used to
switch to IVF above 20k points per class while :class:`KnnIndex` stayed exact to 1M; both
now follow this one function.

This package module is torch-free (the CLI reads :data:`KNN_BACKENDS` without importing
torch); the torch-backed names load on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from npos.errors import MissingDependencyError, ParameterError
from npos.validation import check_choice

#: ``auto`` chooses exact torch search up to this many bank points ...
AUTO_TORCH_MAX = 20_000
#: ... exact faiss search up to this many, and IVF beyond.
AUTO_EXACT_MAX = 1_000_000
AUTO = "auto"

#: name -> backend class, or ``"module:Class"`` for the built-ins (imported on first use, so
#: listing the names needs neither torch nor faiss).
_REGISTRY: dict[str, Any] = {
    "torch": "npos.knn.backends:TorchBackend",
    "faiss-flat": "npos.knn.backends:FaissFlatBackend",
    "faiss-ivf": "npos.knn.ivf:FaissIvfBackend",
}

_INSTALL_HINT = ('install it with: pip install "npos[cpu]" (or pip install "npos[gpu]" on a '
                 'CUDA machine)')

_LAZY = {
    "KnnIndex": "npos.knn.index",
    "knn_kth_distance": "npos.knn.index",
    "KnnBackend": "npos.knn.backends",
    "TorchBackend": "npos.knn.backends",
    "FaissFlatBackend": "npos.knn.backends",
    "FAISS_GPU_MAX_K": "npos.knn.backends",
    "DEFAULT_TARGET_RECALL": "npos.knn.backends",
    "RECALL_SAMPLE": "npos.knn.backends",
    "FaissIvfBackend": "npos.knn.ivf",
    "KnnCache": "npos.knn.ivf",
    "ivf_nlist": "npos.knn.ivf",
    "IVF_MIN_POINTS_PER_LIST": "npos.knn.ivf",
    "IVF_MAX_POINTS_PER_LIST": "npos.knn.ivf",
    "DEFAULT_MEMORY_BUDGET": "npos.knn.kth",
    "kth_largest_": "npos.knn.kth",
    "kth_similarity": "npos.knn.kth",
    "similarity_to_distance": "npos.knn.kth",
    "StoreIndex": "npos.knn.store_index",
    "IndexMismatchError": "npos.knn.store_index",
    "default_index_path": "npos.knn.store_index",
    "build_store_index": "npos.knn.store_index_build",
}


def backend_names() -> tuple[str, ...]:
    """Every backend name a caller may ask for: ``"auto"`` and the registered ones."""
    return (AUTO, *_REGISTRY)


#: The names at import time (built-ins), for CLI choices; :func:`backend_names` is live.
KNN_BACKENDS = backend_names()


def register_backend(name: str, backend: Any, *, replace: bool = False) -> None:
    """Make ``backend`` (a :class:`~npos.knn.backends.KnnBackend` subclass, or
    ``"module:Class"``) usable by name in :class:`KnnIndex` and ``SynthesisConfig(backend=)``.

    Raises :class:`~npos.errors.ParameterError` for ``"auto"``, an empty name, or a name
    already taken (unless ``replace``).
    """
    if not isinstance(name, str) or not name or name == AUTO:
        raise ParameterError(f"a kNN backend needs a non-empty name other than 'auto'; "
                             f"got {name!r}")
    if name in _REGISTRY and not replace:
        raise ParameterError(f"kNN backend {name!r} is already registered "
                             "(pass replace=True to override it)")
    _REGISTRY[name] = backend


def unregister_backend(name: str) -> None:
    """Remove a backend registered with :func:`register_backend` (no error if absent)."""
    _REGISTRY.pop(name, None)


def get_backend(name: str) -> type:
    """The backend class registered as ``name`` (not ``"auto"``: resolve it first)."""
    check_choice("backend", name, tuple(_REGISTRY))
    entry = _REGISTRY[name]
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(import_module(module), attr)
    return entry


def import_faiss(purpose: str) -> Any:
    """Import faiss or raise :class:`MissingDependencyError` with the install hint."""
    try:
        import faiss
    except ImportError:
        raise MissingDependencyError(f"{purpose} needs faiss; {_INSTALL_HINT}") from None
    return faiss


def faiss_available() -> bool:
    """True when ``import faiss`` works."""
    try:
        import_faiss("")
    except MissingDependencyError:
        return False
    return True


def faiss_gpus() -> int:
    """Number of GPUs faiss can use (0 without faiss or with the CPU build)."""
    if not faiss_available():
        return 0
    import faiss

    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def resolve_knn_backend(backend: str, n: int, *, on_gpu: bool = False) -> str:
    """The concrete backend for a bank of ``n`` points: THE ``auto`` policy of npos.

    Parameters
    ----------
    backend : str
        ``"auto"`` or a registered name (returned unchanged).
    n : int
        Bank size (points per class bank for synthesis).
    on_gpu : bool
        The bank lives on (or is asked for on) a CUDA device.
    """
    check_choice("backend", backend, backend_names())
    if backend != AUTO:
        return backend
    if not faiss_available() or (on_gpu and faiss_gpus() == 0) or n <= AUTO_TORCH_MAX:
        return "torch"
    return "faiss-flat" if n <= AUTO_EXACT_MAX else "faiss-ivf"


__all__ = ["AUTO_EXACT_MAX", "AUTO_TORCH_MAX", "KNN_BACKENDS", "backend_names", "faiss_available",
           "faiss_gpus", "get_backend", "import_faiss", "register_backend",
           "resolve_knn_backend", "unregister_backend", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
