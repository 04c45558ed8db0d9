"""Choosing between the macro and micro answers, with the reference's rules.

Multiple-choice questions (options written as lines "A. ...", "B. ..."): when
both answers are valid option letters they are scored by their option texts;
when only one is valid it wins; when neither is, the macro answer stands.
Open-ended questions: both answers are scored (an empty one loses unscored).
Identical answers need no scoring. Lower mean token negative log-likelihood wins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Chosen = Literal["macro", "micro", "same"]

_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.)]\s*(.+?)\s*$")
_LETTER_ANSWER = re.compile(r"^\s*\(?([A-Z])(?:[.):]|\s|$)")


@dataclass(frozen=True)
class Question:
    """A question split into its stem and, for multiple choice, its options."""

    stem: str
    options: dict[str, str]

    @property
    def multiple_choice(self) -> bool:
        return len(self.options) >= 2


def parse_question(text: str) -> Question:
    """Options are consecutive lines A., B., C. ... (or A), (A)) starting with A."""
    stem_lines: list[str] = []
    options: dict[str, str] = {}
    for line in text.splitlines():
        m = _OPTION_LINE.match(line)
        if m and m.group(1) == chr(ord("A") + len(options)):
            options[m.group(1)] = m.group(2)
        elif not options:
            stem_lines.append(line)
        else:
            # Text after the options (e.g. "Answer with the option's letter") is not an option.
            break
    if len(options) < 2:
        return Question(text.strip(), {})
    return Question("\n".join(stem_lines).strip(), options)


def option_letter(answer: str, question: Question) -> str | None:
    m = _LETTER_ANSWER.match(answer)
    return m.group(1) if m and m.group(1) in question.options else None


@dataclass(frozen=True)
class Decision:
    """What fusion does: pick now (`chosen` set) or score `candidates` first."""

    chosen: Chosen | None
    why: str
    # Texts to score as replies, keyed "macro" / "micro", when chosen is None.
    candidates: dict[str, str] | None = None


def decide(question: Question, macro: str, micro: str) -> Decision:
    if question.multiple_choice:
        a, b = option_letter(macro, question), option_letter(micro, question)
        if a and b:
            if a == b:
                return Decision("same", f"both answers are option {a}")
            return Decision(
                None,
                "both answers are valid options; their option texts are scored",
                {"macro": question.options[a], "micro": question.options[b]},
            )
        if a or b:
            return Decision("macro" if a else "micro", f"only the {'macro' if a else 'micro'} answer is a valid option")
        return Decision("macro", "neither answer is a valid option")
    if macro.strip() == micro.strip():
        return Decision("same", "the answers are identical")
    if not macro.strip() or not micro.strip():  # an empty reply has no tokens to score
        return Decision("micro" if micro.strip() else "macro", "the other answer is empty")
    return Decision(None, "the answers differ; both are scored", {"macro": macro, "micro": micro})


def pick_by_score(scores: dict[str, float]) -> tuple[Chosen, str]:
    """Lower mean negative log-likelihood wins; a tie keeps the macro answer."""
    if scores["micro"] < scores["macro"]:
        return "micro", "the micro answer has the lower perplexity"
    return "macro", "the macro answer has the lower (or equal) perplexity"
