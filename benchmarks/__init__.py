"""Speed and quality scripts whose figures are in BENCHMARKS.md.

A package (not loose scripts) so that the scripts and the tests share
:mod:`benchmarks.feature_world` without ``sys.path`` edits. Run a script from the
repository root as a module, e.g. ``python -m benchmarks.head_study``; pytest finds
``benchmarks`` because the repository root is on its ``pythonpath`` (setup.cfg).
Nothing here is installed with npos.
"""
