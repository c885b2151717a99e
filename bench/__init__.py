"""The benchmarks (docs/benchmarks.md): run from the repository root as ``python -m bench.NAME``.

``common`` holds what several benchmarks share (data, batches, passes, clocks, correlations,
verdicts, machine info), ``kronfluence_task`` the kronfluence adapter (also used by
``tests/factors/test_kronfluence.py``), ``lds`` and ``hardworld`` the counterfactual benchmark's
statistics and harder world. Not part of the hub_msif wheel.
"""
