"""Old import path of the k-th-value kernels, kept so existing code keeps working.

The kernels live in :mod:`npos.knn.kth`; new code imports them from there.
"""

from npos.knn.kth import (DEFAULT_MEMORY_BUDGET, kth_largest_, kth_similarity,  # noqa: F401
                          similarity_to_distance)
