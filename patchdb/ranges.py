"""Layer range strings: "40-60", "40,42,44", "40-60:2", and combinations joined by commas.

Numbers are ASCII digits 0-9 only; Arabic-Indic, fullwidth and other Unicode digits (which a
regex digit class and int() would take) are refused like any other unreadable part."""

import re

from patchdb.errors import RangeError

_PART = re.compile(r"([0-9]+)(?:-([0-9]+)(?::([0-9]+))?)?")


def parse_range(text: str) -> list[int]:
    """Parse a range string into a sorted list of distinct non-negative integers."""
    if not isinstance(text, str) or not text.strip():
        raise RangeError(f"invalid range {text!r}: expected e.g. '40-60', '40,42,44' or '40-60:2'")
    values: set[int] = set()
    for raw in text.split(","):
        part = raw.strip()
        match = _PART.fullmatch(part)
        if match is None:
            raise RangeError(
                f"invalid range {text!r}: cannot read {part!r} "
                "(expected e.g. '40-60', '40,42,44' or '40-60:2')"
            )
        start = int(match.group(1))
        stop = int(match.group(2)) if match.group(2) is not None else start
        step = int(match.group(3)) if match.group(3) is not None else 1
        if stop < start:
            raise RangeError(f"invalid range {text!r}: {part!r} ends before it starts")
        if step < 1:
            raise RangeError(f"invalid range {text!r}: step in {part!r} must be at least 1")
        if (stop - start) // step > 100_000:
            raise RangeError(f"invalid range {text!r}: {part!r} is unreasonably long")
        values.update(range(start, stop + 1, step))
    return sorted(values)


def format_range(values: list[int]) -> str:
    """Write a list of integers back as a compact range string ("40-60" or "40,42")."""
    ordered = sorted(set(values))
    if not ordered:
        return ""
    parts: list[str] = []
    start = prev = ordered[0]
    for value in ordered[1:]:
        if value == prev + 1:
            prev = value
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = value
    parts.append(str(start) if start == prev else f"{start}-{prev}")
    return ",".join(parts)
