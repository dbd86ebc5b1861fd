"""``npos sweep``: a grid of synthesis and head settings trained and evaluated from the cache.

Modules: :mod:`~npos.sweep.grid` (parsing and checks), :mod:`~npos.sweep.holdout` (the
``--holdout-classes`` split), :mod:`~npos.sweep.run` (the resumable, parallel runner and the
outputs), :mod:`~npos.sweep.report` (the table), :mod:`~npos.sweep.plots` (the pictures).
See docs/sweep.md.
"""
