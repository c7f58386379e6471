"""Record training run by a framework's own loop: callbacks that drive a ``Recorder``.

- :mod:`icstools.integrations.lightning`: :class:`~icstools.integrations.lightning.RecorderCallback`
  for a Lightning 2.x ``Trainer`` (``pip install icstools[lightning]``);
- :mod:`icstools.integrations.transformers`:
  :class:`~icstools.integrations.transformers.RecorderCallback` for the Hugging Face ``Trainer``
  (``pip install icstools[transformers]``).

Each module imports its framework; this package imports neither.
"""
