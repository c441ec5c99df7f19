"""User-facing errors. Stdlib only.

Every error a user can cause (bad flag, bad file, broken checkpoint) is a `NemodiffError` whose message
is one sentence naming the file or flag and what was expected; the CLI prints it on one line and
exits with status 2.
"""


class NemodiffError(Exception):
    """An error caused by the user's input; its message is shown as-is, without a traceback."""


class ConfigError(NemodiffError):
    """A model config (config.json or preset) is missing a field or is inconsistent."""


class CheckpointError(NemodiffError):
    """A checkpoint folder, weight file or index is missing, broken, or does not match the config."""


class InvalidArgument(NemodiffError, ValueError):
    """A decoding or build argument out of range (also a ValueError for library callers)."""
