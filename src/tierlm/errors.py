"""User-facing errors.

Every problem a user can cause (a bad config, hardware file or flag) is raised as a
`TierlmError` whose message is one line naming the offending field; the CLI prints it
and exits with status 2 instead of showing a traceback.
"""


class TierlmError(ValueError):
    """A one-line, user-facing error about bad input."""


class ConfigError(TierlmError):
    """A model config is missing a field, has an unknown one, or contradicts itself."""


class HardwareError(TierlmError):
    """A hardware description is missing a field or has an impossible value."""
