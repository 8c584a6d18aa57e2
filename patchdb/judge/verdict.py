"""Reading a verdict out of a judge's reply: the last word, else the tail's last letters.

A reply that reached its token cap (finish reason "length") is retried while attempts remain;
one still cut off after the last attempt is read by the same rule, as the original pipeline
read every reply it got, and is stored marked cut off.
"""

TAIL_CHARS = 10


def _letters(text: str) -> str:
    """The letters of `text`, case-folded (punctuation, digits and markdown dropped)."""
    return "".join(ch for ch in text if ch.isalpha()).casefold()


def parse_verdict(reply: str | None) -> bool | None:
    """True for YES, False for NO, None (unparsed, never NO) when the reply says neither.

    First the letters of the last whitespace-separated word decide when they are exactly
    "yes" or "no" ("**YES**", "No."). Otherwise the letters of the last ten characters, after
    trailing whitespace is stripped, decide when they end with "yes" or "no" ("Verdict:YES",
    "YES" followed by a code fence); anything else, an empty reply included, is unparsed. This
    is the original judge's rule.
    """
    if not reply:
        return None
    words = reply.split()
    last = _letters(words[-1]) if words else ""
    if last in ("yes", "no"):
        return last == "yes"
    tail = _letters(reply.rstrip()[-TAIL_CHARS:])
    if tail.endswith("yes"):
        return True
    if tail.endswith("no"):
        return False
    return None


def unfinished(finish_reason: str | None) -> str:
    """The error text of a reply that ended for another reason than "stop"."""
    return f"reply not finished (finish reason {finish_reason!r})"


def last_word_verdict(text: str | None, finish_reason: str | None,
                      error: str | None) -> tuple[bool | None, str | None]:
    """(verdict, error) to store for a last-word reply. A finished reply is read by the rule,
    and so is one cut off at its token cap (finish reason "length", no error but that one):
    a verdict read from it is kept with no error, while one that gives none keeps its error
    (an API reply then waits for `--retry-errors`). Any other failure gives no verdict."""
    if finish_reason not in ("stop", "length") or error not in (None, unfinished(finish_reason)):
        return None, error
    verdict = parse_verdict(text)
    return verdict, (None if verdict is not None else error)
