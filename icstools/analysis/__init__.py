"""Analysis of recorded runs: the ``ds.ics`` accessor, drift metrics, comparison across seeds.

- :mod:`~icstools.analysis.accessor`: ``ds.ics`` (registered on import of :mod:`icstools`);
- :mod:`~icstools.analysis.drift`: per-unit drift metrics from samples and from summaries
  (array kernels in ``drift_arrays``, tail model in ``tails``, aggregates and flags in
  ``drift_flags``);
- :mod:`~icstools.analysis.compare`: conditions across seeds (intervals, tests, q-values; runs to
  numbers in ``metric_values``, t intervals in ``intervals``, their coverage in ``calibration``,
  bootstraps in ``bootstrap``, rank tests and FDR in ``rank_tests``);
- :mod:`~icstools.analysis.metrics`: the one registry of run-level metrics (a run -> a number,
  or one per site) that ``compare`` and the report both use, with one set of defaults.
"""

from icstools.analysis.accessor import AnalysisError, ICSAccessor

__all__ = ["AnalysisError", "ICSAccessor"]
