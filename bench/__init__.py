"""iotvault's benchmarks: every figure is printed beside a baseline measured in the same run.

``make bench`` (``python -m bench``) runs them all; BENCHMARKS.md holds the figures of the last
run on the development machine and the commands. See :mod:`bench.run`.
"""
