"""Scoring in the paper's evaluation formats: VQA accuracy and multiple-choice accuracy.

VQA accuracy (TextVQA, VQAv2): an answer given by k of the human annotators scores
min(k / 3, 1), averaged, as the official evaluators do, over the 10 subsets that leave one
annotator out. Answers are compared after the standard normalisation: the EvalAI answer
processor used by the VQA challenge and by LLaVA's TextVQA evaluation (lower case, punctuation,
number words to digits, articles dropped, contractions restored).

Multiple choice (SEED-Bench, MMBench, GQA-MCQ): options are lines "A. ...", "B. ..." in the
question text; the prediction's option letter, or an option's text given in full, must be the
ground truth's.
"""

from __future__ import annotations

import re

# --- the standard answer normalisation -----------------------------------------------------------

_PUNCTUATION = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# Written as the official code writes it: its "(?!<=\d)" was meant as a look-behind but is a
# look-ahead that never matches, so a period goes unless a digit follows it ("3.5" stays).
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
# The official contraction table maps each form written with one apostrophe missing back to the
# form below; generated here rather than listed. (Its entries for "I'd've", "I'm", "I've" have
# capitals and never match lower-cased text; "let's" and "she's" map to themselves: all left out.)
_CONTRACTION_FORMS = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd
he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've
needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've
somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll
that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've
weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've
why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll
you're you've
""".split()
_CONTRACTIONS = {form[:i] + form[i + 1 :]: form for form in _CONTRACTION_FORMS for i, c in enumerate(form) if c == "'"}
_CONTRACTIONS["somebody'd"] = "somebodyd"  # sic: the official table has this one backwards


def normalize_answer(text: str) -> str:
    """An answer as the VQA evaluators compare it: 'Two dogs.' -> '2 dogs', 'The Coca-Cola' -> 'coca cola'."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    # Punctuation next to a space (or in a text with a digit,digit group) is dropped; inside a
    # word it becomes a space. (The comma rule can no longer fire: commas went above, as in EvalAI.)
    spaced = bool(_DIGIT_COMMA_DIGIT.search(text))
    out = text
    for p in _PUNCTUATION:
        out = out.replace(p, "" if spaced or p + " " in text or " " + p in text else " ")
    out = _PERIOD.sub("", out)
    words = [_NUMBER_WORDS.get(w, w) for w in out.split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """min(#annotators who gave the prediction / 3, 1), averaged over the leave-one-out subsets
    of the annotators (for 10 answers: 3 matches -> 0.9, 4 or more -> 1.0)."""
    if not answers:
        raise ValueError("no ground-truth answers")
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    matches = sum(gt == pred for gt in gts)
    # Leaving out a matching annotator leaves matches - 1 others; any other leaves matches.
    return sum(min((matches - (gt == pred)) / 3, 1.0) for gt in gts) / len(gts)


# --- multiple choice --------------------------------------------------------------------------------

_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.)]\s*(.+?)\s*$")
_LEADING_LETTER = re.compile(r"^\s*\(?([A-Za-z])(?:[.):]|\s|$)")


def parse_options(text: str) -> dict[str, str]:
    """The options written in a question: consecutive lines 'A. ...', 'B. ...' starting at A
    (also 'A) ...', '(A) ...'). Fewer than two: not multiple choice, {}."""
    options: dict[str, str] = {}
    for line in text.splitlines():
        m = _OPTION_LINE.match(line)
        if m and m.group(1) == chr(ord("A") + len(options)):
            options[m.group(1)] = m.group(2)
        elif options:
            break  # the hint after the options ("Answer with the option's letter ...")
    return options if len(options) >= 2 else {}


def option_letter(answer: str, options: dict[str, str]) -> str | None:
    """The option an answer names: its leading letter ('B', 'B.', '(B) red', 'b'), or the full
    text of one option ('red', 'Red.'); None if it names none."""
    m = _LEADING_LETTER.match(answer)
    if m:
        letter = m.group(1)
        # A capital names an option ("B", "B. red", "(B)"), as the server's fusion reads it; a small
        # letter only when it is the whole answer ("b"), not the article of a sentence ("a red car").
        alone = answer.strip().strip("().").lower() == letter.lower()
        if (letter.isupper() or alone) and letter.upper() in options:
            return letter.upper()
    said = answer.strip().rstrip(".").strip().lower()
    for letter, text in options.items():
        if said == text.strip().rstrip(".").strip().lower():
            return letter
    return None


# --- per question ------------------------------------------------------------------------------------


def question_kind(question: dict) -> str | None:
    """How a question is scored: 'vqa' (an `answers` list), 'multiple_choice' (an `answer` and
    options in the text), 'exact' (an `answer`, no options), None (no ground truth)."""
    if isinstance(question.get("answers"), list) and question["answers"]:
        return "vqa"
    if question.get("answer") is not None:
        return "multiple_choice" if parse_options(question["text"]) else "exact"
    return None


def score(question: dict, prediction: str) -> float | None:
    """The prediction's score in [0, 1], or None for a question without ground truth."""
    kind = question_kind(question)
    if kind == "vqa":
        return vqa_accuracy(prediction, [str(a) for a in question["answers"]])
    if kind == "exact":
        return float(normalize_answer(prediction) == normalize_answer(str(question["answer"])))
    if kind == "multiple_choice":
        options = parse_options(question["text"])
        gold = option_letter(str(question["answer"]), options)
        if gold is None:
            raise ValueError(
                f"question {question.get('question_id')!r}: its answer {question['answer']!r} is "
                f"none of its options {', '.join(options)}"
            )
        return float(option_letter(prediction, options) == gold)
    return None
