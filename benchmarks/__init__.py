"""The hypergrad benchmark suite (pytest-benchmark): HVP modes, solvers x problems, peers.

Run it with ``python -m pytest benchmarks --preset small|full --benchmark-json=OUT.json`` (the
benchmarks' own ``benchmarks/pytest.ini`` collects ``bench_*.py``), then turn the JSON into a report
with ``python -m benchmarks.report OUT.json --out results/``. See ``docs/benchmarks.md``.
"""
