"""Errors that mean "the user asked for something that cannot work".

Command-line layers catch :class:`UserError` and print its message on one line
with exit code 2; anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A mistake in user input (flags, config, checkpoint folder, noise file, output path).

    A ValueError, so Python callers that catch bad values catch it too.
    """


class ConfigError(UserError):
    """A config file that is malformed, has unknown or missing keys, or bad values."""


class CheckpointError(UserError):
    """A checkpoint folder that is missing, malformed or disagrees with its config."""
