"""Parsing and printing of sizes: token counts with k/M suffixes, bytes as GiB and GB."""

from __future__ import annotations

import re

from .errors import TierlmError

# Decimal suffixes follow SI (1M = 1,000,000 tokens, the kvcache.ai convention of "the
# integer the user types"); binary suffixes (Ki, Mi) give powers of two, the convention of
# vLLM/DeepSeek context names (a "1M context" model has max_position_embeddings 2**20).
_SUFFIX = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9,
           "Ki": 2**10, "ki": 2**10, "Mi": 2**20, "Gi": 2**30}
_TOKENS = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(Ki|ki|Mi|Gi|k|K|M|G|)\s*$")


def parse_count(text: str, what: str = "context") -> int:
    """'128k' -> 128000, '1M' -> 1000000, '1Mi' -> 1048576, '4096' -> 4096."""
    m = _TOKENS.match(str(text))
    if not m:
        raise TierlmError(f"{what}: cannot read {text!r} as a count (use e.g. 4096, 128k, 1M, 1Mi)")
    number, suffix = m.groups()
    scale = _SUFFIX[suffix]
    if "." in number:
        whole, frac = number.split(".")
        value = int(whole) * scale + int(frac) * scale // 10 ** len(frac)
        if int(frac) * scale % 10 ** len(frac):
            raise TierlmError(f"{what}: {text!r} is not a whole number")
    else:
        value = int(number) * scale
    if value <= 0:
        raise TierlmError(f"{what}: must be a positive whole number, got {text!r}")
    return value


def as_count(value, what: str = "context") -> int:
    """A positive whole count from the Python API: an int, or a string read like the CLI's
    ('128k', '1Mi', '4096'). Floats, bools, None and NaN are errors, never rounded."""
    if isinstance(value, str):
        return parse_count(value, what)
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TierlmError(f"{what} must be a whole number (an int, or a string such as '128k'), got {value!r}")
    n = value.__index__()
    if n <= 0:
        raise TierlmError(f"{what} must be >= 1, got {n}")
    return n


def parse_count_list(text: str, what: str = "context") -> list[int]:
    parts = [p for p in str(text).split(",") if p.strip()]
    if not parts:
        raise TierlmError(f"{what}: empty list")
    return [parse_count(p, what) for p in parts]


GiB = 2**30
GB = 10**9


def fmt_bytes(n: float, short: bool = False) -> str:
    """Both units, labelled: '9.62 GiB (10.33 GB)'; short=True: the binary one only."""
    if short:
        return fmt_bytes(n).split(" (")[0]
    if n < 2**20:
        return f"{n / 2**10:,.1f} KiB ({n / 1e3:,.1f} kB)"
    if n < GiB:
        return f"{n / 2**20:,.2f} MiB ({n / 1e6:,.2f} MB)"
    return f"{n / GiB:,.2f} GiB ({n / GB:,.2f} GB)"


BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str, what: str = "size") -> int:
    """'8GiB', '100GB', '512MiB', '4096' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m and BYTE_UNITS.get(m.group(2).lower())
    if not m or unit is None:
        raise TierlmError(f"{what} must be a byte size such as 8GiB, 100GB or 4096, got {text!r}")
    return int(float(m.group(1)) * unit)


_SECONDS = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def parse_seconds(text: str, what: str = "duration") -> float:
    """'6h', '30m', '90s', '3600' -> seconds (> 0)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    unit = m and _SECONDS.get(m.group(2))
    if not m or unit is None or float(m.group(1)) <= 0:
        raise TierlmError(f"{what} must be a positive duration such as 6h, 30m or 3600, got {text!r}")
    return float(m.group(1)) * unit
