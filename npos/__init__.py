"""npos — Non-parametric Outlier Synthesis for OOD detection, on a feature cache.

Score convention used everywhere in this package: **higher score = more in-distribution**,
and in-distribution is the positive class of every metric.
"""

import logging

__version__ = "0.1.0"

# Library convention: npos's messages go to the "npos" logger tree and are shown only where an
# application (or the npos CLI, npos.log.cli_logging) attaches a handler; never to root.
logging.getLogger(__name__).addHandler(logging.NullHandler())
