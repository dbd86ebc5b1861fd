"""npos — Non-parametric Outlier Synthesis for OOD detection, on a feature cache.

Score convention used everywhere in this package: **higher score = more in-distribution**,
and in-distribution is the positive class of every metric.
"""

__version__ = "0.1.0"
