"""The subcommands of the ``icstools`` command, one module each.

:mod:`icstools.cli` parses the arguments and calls one function here with them; each returns
the exit code and raises :class:`~icstools.commands.common.UsageError` for a user mistake.

- :mod:`~icstools.commands.run`: ``run``, ``list``, ``demo``;
- :mod:`~icstools.commands.sites`: ``sites``;
- :mod:`~icstools.commands.info`: ``info``, ``verify``;
- :mod:`~icstools.commands.outputs`: ``report``, ``figures``, ``export``;
- :mod:`~icstools.commands.common`: exit codes, errors, tables, output checks.
"""
