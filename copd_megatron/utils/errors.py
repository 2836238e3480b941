"""The one exception type for user mistakes, at the bottom of the import graph.

Any layer may raise it; every command-line tool reports it as one line on stderr with exit
code 2 (``copd_megatron.config.schema`` re-exports it as the config error it mostly is).
"""


class ConfigError(ValueError):
    """A user mistake in a config file, override, flag, data file or path: reported as one line, exit code 2."""
