"""The three grader prompts, their version hash, and user templates loaded with `--prompts`.

A template is a str.format string. {prompt} is the question the model was asked (the sweep's
trial turn after its blank line, without its "Trial 1:" label), {response} is the rollout's
answer, {word} is the word a detection+identification grader looks for: the target's word (the
source's only where there is no target word). Write a literal brace as {{ or }}.

The graders are told nothing about how the experiment works: each sees the bare question and
the answer, and is asked to reason first and end with one word, YES or NO. Any change to a text,
or to how the question is filled in, changes the version hash, so judgments made with other
texts stay apart under their own judge config.
"""

import hashlib
import json
import re
import string
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

from patchdb.errors import JudgeError
from patchdb.experiments import GRADERS

PLACEHOLDERS = ("prompt", "response", "word")
REQUIRED: dict[str, tuple[str, ...]] = {
    "coherence": ("response",),
    "detection": ("response",),
    "detection_identification": ("response", "word"),
}

_CONTEXT = """\
Below are a question that was put to an AI model and the model's reply to it.

Question:
{prompt}

Reply:
{response}
"""

_ENDING = """
Reason about the reply step by step first. Then end your message with one word on a line of its
own, YES or NO, and write nothing after that word."""

COHERENCE = _CONTEXT + """
Does the reply coherently describe the model's own thoughts or state of mind?
Answer NO if any of these is true:
- the text is garbled, or the same words or phrases keep coming back;
- the reply does not respond to the question;
- the model says it has no thoughts, or that it cannot look into its own mind;
- the reply drifts into something unrelated, or makes up a context or conversation that is not
  there.
The reply may end in the middle of a sentence because it hit a length limit; that alone is not
a fault. Answer YES if the reply is a sensible first-person account of what the model notices,
whether or not it reports anything unusual.""" + _ENDING

DETECTION = _CONTEXT + """
Does the model affirmatively claim that it noticed an unusual or injected thought?
Answer YES if the model says that it notices, detects or senses such a thought. Answer NO if it
says it notices nothing out of the ordinary, if it hedges without claiming anything, or if it
only talks about the question in general.""" + _ENDING

DETECTION_IDENTIFICATION = _CONTEXT + """
Does the model affirmatively and clearly claim that it noticed an injected or unusual thought,
and say that this thought is about "{word}" or something closely related to "{word}"?
Answer YES if it does. The claim may be implicit, as long as it is clear: a model that says it
finds itself drawn to the idea of "{word}", or that "{word}" keeps coming to its mind, is
claiming it. The claim of noticing must come before the word, or in the same breath as it.
Answer NO if any of these is true:
- the model says "{word}" (or a closely related word) first and only afterwards claims to have
  noticed a thought; this includes a reply whose very first word is "{word}";
- the model does not clearly claim an unusual thought (it says there is none, hedges, or only
  wonders whether there might be one), or does not say what the thought is about;
- the thought it names is a concept unrelated to "{word}";
- it "detects" {word} in a physical sense, for example by seeing, smelling or hearing it, rather
  than as a thought in its mind.""" + _ENDING


_TRIAL_LABEL = re.compile(r"Trial\s+\d+\s*:\s*")
# How {prompt} is filled in; part of the version hash, since it changes what every grader sees.
QUESTION_SHOWN = "the trial question without its lead-in or its 'Trial N:' label"


def trial_question(trial: str) -> str:
    """The question the judge is shown, as the original's judge saw it: the trial turn after
    its last blank line (not the lead-in "Ok, let's get started."), without the "Trial 1:"
    label in front of it."""
    question = trial.rsplit("\n\n", 1)[-1].strip()
    label = _TRIAL_LABEL.match(question)
    return question[label.end():] if label else question


@dataclass(frozen=True)
class Templates:
    """One template per grader."""

    coherence: str = COHERENCE
    detection: str = DETECTION
    detection_identification: str = DETECTION_IDENTIFICATION

    def text(self, grader: str) -> str:
        if grader not in GRADERS:
            raise JudgeError(f"unknown grader {grader!r} (known: {', '.join(GRADERS)})")
        return str(getattr(self, grader))

    def to_json(self) -> str:
        """Canonical JSON: the input of the version hash and what judge_configs stores."""
        return json.dumps(asdict(self), sort_keys=True, ensure_ascii=False)

    @property
    def version(self) -> str:
        """A short sha256 of the three texts and of how the question is filled in
        (QUESTION_SHOWN); any change to either changes it."""
        text = self.to_json() + "\n" + QUESTION_SHOWN
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def render(self, grader: str, prompt: str, response: str, word: str) -> str:
        """The grader's prompt for one answer; `prompt` is the trial turn, of which only the
        bare question is shown."""
        return self.text(grader).format(prompt=trial_question(prompt), response=response,
                                        word=word)


DEFAULT_TEMPLATES = Templates()


def _fields(name: str, text: str) -> set[str]:
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    except ValueError as exc:
        raise JudgeError(f"template {name!r} is not a valid format string: {exc}") from None
    return names


def check_template(name: str, text: str) -> None:
    """Refuse a template that lacks a placeholder its grader needs or uses an unknown one."""
    found = _fields(name, text)
    for placeholder in REQUIRED[name]:
        if placeholder not in found:
            raise JudgeError(f"template {name!r} lacks the placeholder {{{placeholder}}}")
    for placeholder in sorted(found):
        if placeholder not in PLACEHOLDERS:
            raise JudgeError(
                f"template {name!r} uses the unknown placeholder {{{placeholder}}} "
                f"(known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}; "
                "write a literal brace as {{ or }})"
            )


def load_templates(path: str | Path) -> Templates:
    """Read user templates from a TOML or JSON file with keys coherence, detection and
    detection_identification; a grader left out keeps the built-in template."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JudgeError(f"prompts file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise JudgeError(f"cannot read prompts file {p}: {exc}") from None
    try:
        data = json.loads(text) if p.suffix.lower() == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise JudgeError(f"cannot parse prompts file {p}: {exc}") from None
    if not isinstance(data, dict):
        raise JudgeError(f"prompts file {p} must map grader names to templates")
    values: dict[str, str] = {}
    for name, value in data.items():
        if name not in GRADERS:
            raise JudgeError(
                f"prompts file {p} has an unknown grader {name!r} (known: {', '.join(GRADERS)})"
            )
        if not isinstance(value, str) or not value.strip():
            raise JudgeError(f"template {name!r} in {p} must be a non-empty string")
        check_template(name, value)
        values[name] = value
    return Templates(**values)
