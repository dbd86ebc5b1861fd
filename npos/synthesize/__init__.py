"""Outlier synthesis: the batched NPOS engine, its ``vos``/``gaussian`` controls, kNN
backends and per-class ring buffers for online use.

>>> from npos.synthesize import SynthesisConfig, synthesize, ClassQueues
>>> queues = ClassQueues(num_classes, capacity=1000, dim=512)
>>> queues.push(h.detach(), y)
>>> out = synthesize(queues.banks, SynthesisConfig(), ready=queues.ready,
...                  generator=torch.Generator().manual_seed(0))
"""

from npos.synthesize.config import BACKENDS, DEFAULT_SIGMA, METHODS, NOISE_SPACES, SynthesisConfig
from npos.synthesize.engine import SynthesisResult, SynthesisStats, synthesize
from npos.synthesize.knn import KnnIndex, knn_kth_distance
from npos.synthesize.queues import ClassQueues

__all__ = ["BACKENDS", "DEFAULT_SIGMA", "METHODS", "NOISE_SPACES", "ClassQueues", "KnnIndex",
           "SynthesisConfig", "SynthesisResult", "SynthesisStats", "knn_kth_distance",
           "synthesize"]
