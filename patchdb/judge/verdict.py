"""Reading a verdict out of a judge's reply: the last word, else the tail's last letters."""

TAIL_CHARS = 10


def _letters(text: str) -> str:
    """The letters of `text`, case-folded (punctuation, digits and markdown dropped)."""
    return "".join(ch for ch in text if ch.isalpha()).casefold()


def parse_verdict(reply: str | None) -> bool | None:
    """True for YES, False for NO, None (unparsed, never NO) when the reply says neither.

    First the letters of the last whitespace-separated word decide when they are exactly
    "yes" or "no" ("**YES**", "No."). Otherwise the letters of the reply's last ten characters
    decide when they end with "yes" or "no" ("Verdict:YES", "YES" followed by a code fence);
    anything else, an empty reply included, is unparsed. This is the original judge's rule.
    """
    if not reply:
        return None
    words = reply.split()
    last = _letters(words[-1]) if words else ""
    if last in ("yes", "no"):
        return last == "yes"
    tail = _letters(reply[-TAIL_CHARS:])
    if tail.endswith("yes"):
        return True
    if tail.endswith("no"):
        return False
    return None
