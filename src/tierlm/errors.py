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


def did_you_mean(close: list[str]) -> str:
    """The sentence " Did you mean 'a', 'b' or 'c'?" for a list of suggestions; "" for none."""
    if not close:
        return ""
    names = [repr(c) for c in close]
    listed = ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
    return f" Did you mean {listed}?"
