"""Outlier synthesis: the batched NPOS engine, its ``vos``/``gaussian`` controls and per-class
ring buffers for online use. The kNN backends live in :mod:`npos.knn` (``KnnIndex`` and
``knn_kth_distance`` are re-exported here for old imports).

>>> from npos.synthesize import SynthesisConfig, synthesize, ClassQueues
>>> queues = ClassQueues(num_classes, capacity=1000, dim=512)
>>> queues.push(h.detach(), y)
>>> out = synthesize(queues.banks, SynthesisConfig(), ready=queues.ready,
...                  generator=torch.Generator().manual_seed(0))

The configuration names load at once; the torch-backed names load on first use, so the CLI
(whose options come from :mod:`npos.synthesize.config`) starts without importing torch.
"""

from importlib import import_module

from npos.synthesize.config import BACKENDS, DEFAULT_SIGMA, METHODS, NOISE_SPACES, SynthesisConfig

_LAZY = {
    "SynthesisResult": "npos.synthesize.engine",
    "SynthesisStats": "npos.synthesize.engine",
    "synthesize": "npos.synthesize.engine",
    "KnnIndex": "npos.knn.index",
    "knn_kth_distance": "npos.knn.index",
    "KnnCache": "npos.knn.ivf",
    "ClassQueues": "npos.synthesize.queues",
}

__all__ = ["BACKENDS", "DEFAULT_SIGMA", "METHODS", "NOISE_SPACES", "SynthesisConfig", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
