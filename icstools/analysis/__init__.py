"""Analysis of recorded runs: the ``ds.ics`` accessor, drift metrics, comparison across seeds.

- :mod:`~icstools.analysis.accessor`: ``ds.ics`` (registered on import of :mod:`icstools`);
- :mod:`~icstools.analysis.drift`: per-unit drift metrics from samples and from summaries;
- :mod:`~icstools.analysis.compare`: conditions across seeds (intervals, tests, q-values);
- :mod:`~icstools.analysis.metrics`: the one registry of run-level metrics (a run -> a number,
  or one per site) that ``compare`` and the report both use, with one set of defaults.
"""

from icstools.analysis.accessor import AnalysisError, ICSAccessor

__all__ = ["AnalysisError", "ICSAccessor"]
