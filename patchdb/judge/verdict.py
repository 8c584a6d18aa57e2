"""Reading a verdict out of a judge's reply, as SPEC.md says: the last word, letters only."""


def parse_verdict(reply: str | None) -> bool | None:
    """True for a final YES, False for a final NO, None (unparsed) for anything else.

    Only the letters of the last whitespace-separated word count, case-folded, so
    "**YES**", "No." and "yes!" parse; "YES, probably" or an empty reply do not.
    """
    if not reply:
        return None
    words = reply.split()
    if not words:
        return None
    last = "".join(ch for ch in words[-1] if ch.isalpha()).casefold()
    if last == "yes":
        return True
    if last == "no":
        return False
    return None
