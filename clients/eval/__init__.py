"""Evaluation in the paper's formats against a running DualFocus server (`dualfocus eval`).

    from clients.eval import normalize_answer, vqa_accuracy, score
    score({"text": "What is it?", "answers": ["dog"] * 10}, "A dog.")  # 1.0

Talks to the server over HTTP through clients.python; needs nothing from the engine.
"""

from .harness import Answer, EvalError, ask_all, load_questions, report, summarize, write_answers
from .scoring import normalize_answer, option_letter, parse_options, question_kind, score, vqa_accuracy

__all__ = [
    "Answer",
    "EvalError",
    "ask_all",
    "load_questions",
    "normalize_answer",
    "option_letter",
    "parse_options",
    "question_kind",
    "report",
    "score",
    "summarize",
    "vqa_accuracy",
    "write_answers",
]
