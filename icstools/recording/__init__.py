"""Recording: the :class:`~icstools.recording.recorder.Recorder` and what it is made of.

- :mod:`~.recorder`: the ``Recorder``, whose keywords configure the core and switch on the
  built-in measurements;
- :mod:`~.core`: the lifecycle (hooks, step counting, schedule, opening and closing records,
  dispatch of a recorded step's events to the measurements, ``log``, ``to_dataset``);
- :mod:`~.measurements`: one module per measurement, and the interface they implement;
- :mod:`~.hooks`: the only place in icstools that registers hooks (``HookGroup``);
- :mod:`~.isolation`: the one side-effect guard (modes, buffers, RNG, grad mode);
- :mod:`~.layout` (sites, units and the shape of a run), :mod:`~.sink` (memory or store),
  :mod:`~.options` (the recorder's own keywords and ``recorder_config``), :mod:`~.errors`.

This ``__init__`` imports nothing, so that the maths (:mod:`icstools.functional`) can use the
hook module and the guard without importing the recorder.
"""
