"""The sweep's optional controls (`[sweep] controls`) and the unrelated questions they ask.

- `random_vector`: for each target word of an experiment, a random direction scaled to the norm
  of that word's concept vector, injected like the word with no patch and judged like a
  baseline. Its rollouts sit at patch layer RANDOM_VECTOR_LAYER with source word NO_STEERING.
- `unrelated_questions`: each question below is asked in place of the trial question, at every
  unit the sweep prefills and with nothing injected; only the first-token readout is kept (no
  rollouts, no judge). The yes-bias index is the mean P(yes) with the unit's injection minus
  the mean P(yes) with none (docs/science.md).
"""

from patchdb.experiments import RANDOM_VECTOR_LAYER

__all__ = ["CONTROLS", "RANDOM_VECTOR", "RANDOM_VECTOR_LAYER", "TRIAL_QUESTION", "UNRELATED",
           "UNRELATED_QUESTIONS", "question_label", "unrelated_questions"]

RANDOM_VECTOR = "random_vector"
UNRELATED_QUESTIONS = "unrelated_questions"
CONTROLS = (RANDOM_VECTOR, UNRELATED_QUESTIONS)

# Random-vector rollouts sit at RANDOM_VECTOR_LAYER (patchdb.experiments; baselines use -1).
# The readout of the sweep's own trial question is stored with this question text.
TRIAL_QUESTION = ""

# Yes/no questions with known answers, half true and half false, written for patchdb. None is
# about the sweep's words or about thoughts, so an injected concept gives no reason to say yes.
# (question, the true answer)
UNRELATED: tuple[tuple[str, bool], ...] = (
    ("Is Paris the capital of France?", True),
    ("Do spiders have eight legs?", True),
    ("Is the Pacific the largest ocean on Earth?", True),
    ("Does the Earth orbit the Sun?", True),
    ("Is ice frozen water?", True),
    ("Does a triangle have three sides?", True),
    ("Do bees make honey?", True),
    ("Is seven a prime number?", True),
    ("Is the Moon smaller than the Earth?", True),
    ("Is a week seven days long?", True),
    ("Is the Sun a planet?", False),
    ("Do fish breathe with lungs?", False),
    ("Is Tokyo the capital of Brazil?", False),
    ("Is ten an odd number?", False),
    ("Can a person breathe underwater without equipment?", False),
    ("Is gold lighter than water?", False),
    ("Does a year have ten months?", False),
    ("Is fresh snow usually black?", False),
    ("Do cats have six legs?", False),
    ("Is the number two larger than five?", False),
)


def unrelated_questions() -> list[str]:
    """The unrelated questions, in their fixed order."""
    return [question for question, _ in UNRELATED]


def question_label(question: str) -> str:
    """How a readout's question is shown: '(trial)' for the sweep's own trial question."""
    return "(trial)" if question == TRIAL_QUESTION else question
