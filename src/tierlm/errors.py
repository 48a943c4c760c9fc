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


def os_error(path, e: OSError, cls: type[TierlmError] = TierlmError) -> TierlmError:
    """One-line error for an OSError met reading `path` (unreadable, a directory, an I/O error)."""
    if isinstance(e, IsADirectoryError):
        why = "is a directory, expected a file"
    else:
        why = e.strerror or str(e) or type(e).__name__
    return cls(f"{path}: cannot read ({why})")


def read_text(path, cls: type[TierlmError] = TierlmError) -> str:
    """A text file's contents; an OS error (unreadable, a directory, EIO) or bytes that are not
    UTF-8 become a one-line `cls` naming the file."""
    from pathlib import Path
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise os_error(path, e, cls) from None
    except UnicodeDecodeError as e:
        raise cls(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
