"""The ``keybroker`` command line: keys, data keys, encryption, tokens and the audit log.

Modules: :mod:`~keybroker_client.cli.app` (the root command, global options and :func:`main`),
one module per command group (:mod:`~keybroker_client.cli.keys`,
:mod:`~keybroker_client.cli.crypto`, :mod:`~keybroker_client.cli.tokens`,
:mod:`~keybroker_client.cli.audit`), :mod:`~keybroker_client.cli.errors` (the one-line error
report and the exit codes), :mod:`~keybroker_client.cli.options` (option types),
:mod:`~keybroker_client.cli.render` and :mod:`~keybroker_client.cli.output` (what is printed).
"""

from __future__ import annotations

from keybroker_client.cli.app import cli, main

__all__ = ["cli", "main"]
