"""Recording: the :class:`~icstools.recording.recorder.Recorder` and what it is made of.

- :mod:`~icstools.recording.recorder`: the ``Recorder``.
"""
