"""Old import path of the kNN backends, kept so existing code keeps working.

The kNN code lives in :mod:`npos.knn`; new code imports it from there. This module *is*
:mod:`npos.knn` (it replaces itself in ``sys.modules``), not a copy of its names, so that
``from npos.synthesize.knn import KnnIndex`` and patches through the old path (e.g. of
``AUTO_TORCH_MAX``) reach the one ``auto`` policy.
"""

import sys

import npos.knn

sys.modules[__name__] = npos.knn
