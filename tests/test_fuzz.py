"""Fuzzing with hypothesis: the JSON importer, the range parser and the verdict parser.

Whatever they are fed, only the project's typed errors (PatchdbError subclasses) may escape.
"""

import json
import re
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patchdb.errors import ImportFormatError, PatchdbError, RangeError
from patchdb.experiments import EXPERIMENTS
from patchdb.judge.verdict import parse_verdict
from patchdb.ranges import format_range, parse_range
from patchdb.report.importer import read_tree

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- the range parser --------------------------------------------------------------------------

RANGE_TOKENS = st.lists(st.sampled_from(list("0123456789-,: ") + ["\t", "٣", "+", "x", "99999999999"]),
                        max_size=20).map("".join)


@FUZZ
@given(st.one_of(st.text(), RANGE_TOKENS))
def test_parse_range_returns_layers_or_a_range_error(text: str) -> None:
    try:
        layers = parse_range(text)
    except RangeError:
        return
    assert layers == sorted(set(layers)) and all(isinstance(n, int) and n >= 0 for n in layers)
    assert parse_range(format_range(layers)) == layers


@FUZZ
@given(st.one_of(st.text(), RANGE_TOKENS))
def test_an_accepted_range_is_written_in_ascii(text: str) -> None:
    try:
        parse_range(text)
    except RangeError:
        return
    assert all(c in "0123456789-,:" for c in text if not c.isspace()), text


NON_ASCII_DIGITS = st.characters(categories=["Nd"]).filter(lambda c: not c.isascii())


@FUZZ
@given(st.lists(st.integers(0, 99), min_size=1, max_size=3), st.data())
def test_non_ascii_digits_are_a_range_error(numbers: list[int], data: st.DataObject) -> None:
    """Any decimal digit outside 0-9 makes the text unreadable, wherever it stands."""
    text = ",".join(map(str, numbers))
    position = data.draw(st.integers(0, len(text)))
    digit = data.draw(NON_ASCII_DIGITS)
    text = text[:position] + digit + text[position:]
    try:
        parse_range(text)
    except RangeError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(f"invalid range {text!r}: cannot read ")
    else:
        raise AssertionError(f"{text!r} was accepted")


@FUZZ
@given(st.lists(st.integers(min_value=0, max_value=500), min_size=1, max_size=40))
def test_format_range_round_trips(layers: list[int]) -> None:
    assert parse_range(format_range(layers)) == sorted(set(layers))


@FUZZ
@given(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6))
def test_parts_with_huge_spans_are_refused_not_expanded(start: int, stop: int, step: int) -> None:
    text = f"{start}-{stop}:{step}"
    try:
        layers = parse_range(text)
    except RangeError:
        return
    assert len(layers) <= 100_001 and layers[0] == start


# --- the verdict parser ------------------------------------------------------------------------

VERDICT_WORDS = st.sampled_from(["YES", "No", "yes!", "**NO**", "YES,", "maybe", "", "\n", "NOPE",
                                 "Verdict:YES", "eyes", "casino", "```", "1no", "ß", "Yes_",
                                 "No123456789", "YES!!!!!!!!", "........", "\n```\n"])


@FUZZ
@given(st.one_of(st.none(), st.text(), st.lists(st.one_of(st.text(max_size=8), VERDICT_WORDS))
                 .map(" ".join), st.lists(VERDICT_WORDS, max_size=4).map("".join),
                 st.lists(VERDICT_WORDS, max_size=4).map(" ".join)))
def test_parse_verdict_agrees_with_a_second_reading_of_the_rule(reply: str | None) -> None:
    """An independent reading of the documented rule, by regular expressions on the text."""
    assert parse_verdict(reply) is verdict_by_regex(reply)


def verdict_by_regex(reply: str | None) -> bool | None:
    """The rule written a second way: strip non-letters by a regex, then compare."""
    if reply is None:
        return None
    def letters(text: str) -> str:
        return re.sub(r"[^\w]|[\d_]", "", text).casefold() if text.isascii() else "".join(
            filter(str.isalpha, text)).casefold()
    words = re.findall(r"\S+", reply)
    if words and letters(words[-1]) in ("yes", "no"):
        return letters(words[-1]) == "yes"
    match = re.search(r"(yes|no)$", letters(re.sub(r"\s+\Z", "", reply)[-10:]))
    return None if match is None else match.group(1) == "yes"


@FUZZ
@given(st.text(), st.sampled_from(["YES", "**Yes**", "yes.", "NO", "No!", "no"]))
def test_the_last_word_decides(prefix: str, word: str) -> None:
    assert parse_verdict(f"{prefix} {word}") == word.strip("*.!").casefold().startswith("y")


# --- the JSON importer -------------------------------------------------------------------------

WORDS = st.sampled_from(["Bread", "Trees", "Dust", "Dust_to_Bread", "Bread_to_Dust", "Café", "",
                         "_to_", "Bread_to_", "a/b", "..", "Bread_to_Trees_to_Dust"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                    st.text(max_size=20))
ANY_JSON = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(WORDS, st.text(max_size=6)), inner,
                                                 max_size=4)), max_leaves=12)
# Shapes close to the real layout, so the fuzzer gets past the first checks.
SAMPLE_LISTS = st.lists(st.one_of(st.none(), st.booleans(), st.text(max_size=10)), max_size=4)
NEAR_LAYOUT = st.dictionaries(WORDS, st.one_of(SAMPLE_LISTS, SCALARS), max_size=4)
VALID_ROLLOUTS = st.dictionaries(
    st.sampled_from(["Bread", "Trees", "Dust", "Dust_to_Bread", "Bread_to_Dust"]),
    st.lists(st.text(max_size=10), max_size=4), max_size=3)
CONTENT = st.one_of(ANY_JSON.map(json.dumps), NEAR_LAYOUT.map(json.dumps),
                    VALID_ROLLOUTS.map(json.dumps),
                    st.binary(max_size=40).map(lambda b: b.decode("latin-1")))
FILES = st.sampled_from(["rollouts.json", "judgments_coherence.json", "judgments_detection.json",
                         "judgments_detection_identification.json", "judge_scores.json",
                         "judgments_vibes.json", "notes.txt"])
ROOTLESS_MESSAGES = {"no rollouts.json found under any layer_<L> folder"}
TREE_FILE = st.tuples(st.sampled_from(list(EXPERIMENTS)), st.integers(0, 45), FILES, CONTENT)


def write_file(root: Path, relative: Path, content: str | bytes) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", errors="surrogatepass")


@FUZZ
@given(st.lists(TREE_FILE, min_size=1, max_size=6),
       st.one_of(st.none(), st.dictionaries(st.text(max_size=4), ANY_JSON, max_size=3)),
       st.sampled_from([None, 0, 1]))
def test_read_tree_accepts_or_raises_a_typed_error(
    files: list[tuple[str, int, str, str]], all_scores: Any, steer_layer: int | None
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "sweep"
        for experiment, layer, name, content in files:
            write_file(root, Path(experiment) / f"layer_{layer}" / name, content)
        if all_scores is not None:
            write_file(root, Path(files[0][0]) / "all_layer_scores.json", json.dumps(all_scores))
        try:
            plan = read_tree(root, steer_layer=steer_layer)
        except PatchdbError as exc:
            message = str(exc)
            assert "\n" not in message, message
            assert message.startswith(str(root)) or message in ROOTLESS_MESSAGES or (
                message.startswith("patch layers start at ") and steer_layer is None), message
            return
        # Accepted: the plan holds exactly the answers of the rollouts.json files written last.
        written = {(experiment, layer): content for experiment, layer, name, content in files
                   if name == "rollouts.json"}
        answers = sum(len(v) for content in written.values() for v in json.loads(content).values())
        assert plan.n_rollouts == answers
        assert parse_range(plan.config.patch_layers) == sorted({layer for _, layer in written})


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(list(EXPERIMENTS)), st.integers(1, 45)), min_size=1,
                max_size=5), st.data())
def test_read_tree_holds_every_answer_written(places: list[tuple[str, int]],
                                              data: st.DataObject) -> None:
    """Well-formed rollouts files only: the plan has each answer and each layer, counted here."""
    words = st.sampled_from(["Bread", "Trees", "Dust", "Café"])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "sweep"
        written: dict[tuple[str, int], dict[str, list[str]]] = {}
        for experiment, layer in places:
            keys = (st.tuples(words, words).map("_to_".join) if EXPERIMENTS[experiment].pairs
                    else words)
            content = data.draw(st.dictionaries(keys, st.lists(st.text(max_size=6), max_size=5),
                                                max_size=3))
            written[(experiment, layer)] = content
            write_file(root, Path(experiment) / f"layer_{layer}" / "rollouts.json",
                       json.dumps(content))
        plan = read_tree(root, steer_layer=0)
    read = {(e.name, la.layer): {k: v for k, v in la.rollouts.items()}
            for e in plan.experiments for la in e.layers}
    assert plan.n_rollouts == sum(len(v) for c in written.values() for v in c.values())
    assert sorted(read) == sorted(written)
    for place, content in written.items():
        assert sorted(a for v in read[place].values() for a in v) == sorted(
            a for v in content.values() for a in v)
    assert parse_range(plan.config.patch_layers) == sorted({layer for _, layer in written})


@FUZZ
@given(st.binary(max_size=60))
def test_read_tree_on_raw_bytes(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "sweep"
        write_file(root, Path("unsteered_to_steered") / "layer_40" / "rollouts.json", content)
        try:
            read_tree(root)
        except ImportFormatError as exc:
            assert "rollouts.json" in str(exc) or "steer layer" in str(exc)
