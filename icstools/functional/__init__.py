"""The maths behind the measurements, as plain functions and mergeable state.

No hook is registered here and nothing is read or written: each module takes tensors (or a model
and its inputs) and returns numbers. The recorder's measurements
(:mod:`icstools.recording.measurements`) call these; users can call them directly.

- :mod:`~icstools.functional.statistics`: streaming, mergeable per-unit activation statistics
  (:mod:`~icstools.functional.exact`: the exact-mode fold of many records at once;
  :mod:`~icstools.functional.kernels`: their compiled passes on the CPU);
- :mod:`~icstools.functional.state`: states declared field by field, and their exact merge;
- :mod:`~icstools.functional.gradient_statistics`: per-unit moments of a site's gradient;
- :mod:`~icstools.functional.gradients`: gradient-based ICS, loss-landscape probes, the §3.3
  scale-invariance identities;
- :mod:`~icstools.functional.jacobians`: singular values of Jacobians of blocks and segments
  (:mod:`~icstools.functional.jacobian_operator`: the per-example operator and its block-Krylov
  solver; :mod:`~icstools.functional.jacobian_blocks`: whole models and segments).
"""
