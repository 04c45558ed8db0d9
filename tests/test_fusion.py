"""The reference's fusion rules."""

from engine.fusion import decide, option_letter, parse_question, pick_by_score

MC = (
    "What is on the table?\nA. a cup\nB. a plate\nC. a fork\n"
    "Answer with the option's letter from the given choices directly."
)


def test_parse_question_finds_options_and_stem():
    q = parse_question(MC)
    assert q.multiple_choice
    assert q.stem == "What is on the table?"
    assert q.options == {"A": "a cup", "B": "a plate", "C": "a fork"}


def test_open_question_has_no_options():
    q = parse_question("What colour is the car?")
    assert not q.multiple_choice and q.stem == "What colour is the car?"


def test_option_letters_must_start_at_a_and_run_consecutively():
    assert not parse_question("Rate it.\nB. good\nC. bad").multiple_choice


def test_option_letter_accepts_common_forms():
    q = parse_question(MC)
    assert [option_letter(a, q) for a in ["B", "B.", "(C)", "A) a cup", " C", "D", "Banana", ""]] == \
        ["B", "B", "C", "A", "C", None, None, None]


def test_multiple_choice_both_valid_and_different_scores_option_texts():
    d = decide(parse_question(MC), "A", "B.")
    assert d.chosen is None and d.candidates == {"macro": "a cup", "micro": "a plate"}


def test_multiple_choice_same_letter_is_same():
    assert decide(parse_question(MC), "A", "A.").chosen == "same"


def test_multiple_choice_only_one_valid_wins():
    assert decide(parse_question(MC), "zebra", "C").chosen == "micro"
    assert decide(parse_question(MC), "B", "zebra").chosen == "macro"


def test_multiple_choice_neither_valid_keeps_macro():
    assert decide(parse_question(MC), "x", "y").chosen == "macro"


def test_open_ended_identical_needs_no_scoring():
    d = decide(parse_question("What colour?"), " red", "red ")
    assert d.chosen == "same" and d.candidates is None


def test_open_ended_different_answers_are_scored():
    d = decide(parse_question("What colour?"), "red", "blue")
    assert d.chosen is None and d.candidates == {"macro": "red", "micro": "blue"}


def test_open_ended_empty_answer_loses_without_scoring():
    assert decide(parse_question("What colour?"), "", "red").chosen == "micro"
    assert decide(parse_question("What colour?"), "red", "  ").chosen == "macro"


def test_lower_nll_wins_and_a_tie_keeps_macro():
    assert pick_by_score({"macro": 2.0, "micro": 1.5})[0] == "micro"
    assert pick_by_score({"macro": 1.5, "micro": 2.0})[0] == "macro"
    assert pick_by_score({"macro": 1.5, "micro": 1.5})[0] == "macro"
