"""Golden tests of the task metrics: VQA accuracy on hand-worked cases, caption metrics against pycocoevalcap's own
COCOEvalCap run."""
import json
import shutil

import pytest

from finetune.metrics.vqa import answer_vocab, normalize_answer, soft_targets, vqa_accuracy, vqa_score


# --- VQA normalisation: one case per rule -------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("  yes\n", "yes"),                      # newline/tab become spaces, ends trimmed
    ("blue\tsky", "blue sky"),
    ("Two", "2"),                            # lower case, then number words
    ("none", "0"),
    ("one two ten eleven", "1 2 10 eleven"),  # only zero..ten are mapped
    ("a dog", "dog"),                        # articles dropped
    ("The An cat", "cat"),
    ("dont", "don't"),                       # contractions
    ("Dont know", "don't know"),             # ... applied after lower-casing
    ("Im", "im"),                            # so the table's capitalised keys never match
    ("yes!", "yes"),                         # punctuation not touching a space -> space
    ("hot-dog", "hot dog"),
    ("hot - dog", "hot dog"),                # touching a space -> deleted
    ("red, blue", "red blue"),
    ("red,blue", "red blue"),
    ("1,000", "1000"),                       # comma between digits -> every listed mark deleted, not spaced
    ("3,000 ft-lb", "3000 ftlb"),
    ("ft-lb", "ft lb"),
    ("3.5", "3.5"),                          # a period before a digit stays
    ("yes.", "yes"),                         # any other period goes, even after a digit
    ("5.", "5"),
    ("mr.bean", "mrbean"),
    ("don't", "don't"),                      # apostrophes and colons are not in the list
    ("10:30", "10:30"),
    ("(the) two dogs?", "2 dogs"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_normalize_answer_is_idempotent_on_its_outputs():
    for raw in ["Two dogs!", "1,000 (approx.)", "the dont", "hot - dog", "3.5 m/s"]:
        once = normalize_answer(raw)
        assert normalize_answer(once) == once


def test_at_most_32_periods_are_removed_like_the_official_script():
    assert normalize_answer("." * 40) == "." * 8


# --- VQA accuracy: the leave-one-out steps ------------------------------------------------------------------------

@pytest.mark.parametrize("matching, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)])
def test_accuracy_steps_with_ten_answers(matching, expected):
    # Hand-worked: k matching annotators; leaving out a matching one leaves k - 1, a non-matching one leaves k.
    # k=1: 9 * (1/3) / 10 = 0.3; k=2: (2 * 1/3 + 8 * 2/3) / 10 = 0.6; k=3: (3 * 2/3 + 7 * 1) / 10 = 0.9.
    answers = ["cat"] * matching + ["dog", "bird"] * 5
    answers = answers[:10]
    assert sum(a == "cat" for a in answers) == matching
    assert vqa_accuracy("cat", answers) == pytest.approx(expected, abs=1e-12)


def test_accuracy_normalises_when_annotators_disagree():
    answers = ["2", "2", "two", "Two.", "three", "3", "3", "2", "a few", "2"]
    # "two", "Two." and "2" all normalise to "2": 6 annotators agree with the prediction.
    assert vqa_accuracy("Two", answers) == 1.0
    assert vqa_accuracy("3", answers) == pytest.approx(0.9)   # three, 3, 3
    assert vqa_accuracy("few", answers) == pytest.approx(0.3)  # "a few" -> "few"
    assert vqa_accuracy("four", answers) == 0.0


def test_unanimous_answers_are_compared_without_normalisation():
    # The official script normalises only when the answers differ: a unanimous "2" does not match "two".
    assert vqa_accuracy("two", ["2"] * 10) == 0.0
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0    # but whitespace is still trimmed
    assert vqa_accuracy("two", ["2"] * 9 + ["two"]) == 1.0  # one differing answer switches normalisation on


def test_fewer_than_ten_answers_use_the_same_leave_one_out_formula():
    # 3 answers, all matching: each subset of 2 has 2 matches -> 2/3.
    assert vqa_accuracy("cat", ["cat"] * 3) == pytest.approx(2 / 3)
    # 5 answers, 2 matching: (2 * 1/3 + 3 * 2/3) / 5.
    assert vqa_accuracy("cat", ["cat", "cat", "dog", "dog", "cow"]) == pytest.approx((2 / 3 + 2) / 5)
    assert vqa_accuracy("cat", ["cat"] * 4) == 1.0
    with pytest.raises(ValueError, match="at least 2"):
        vqa_accuracy("cat", ["cat"])


def test_vqa_score_overall_and_per_type_in_percent():
    answers = {1: ["cat"] * 10, 2: ["dog"] + ["cow"] * 9, 3: ["2"] * 2 + ["3"] * 8, 4: ["red"] * 10}
    predictions = {1: "cat", 2: "dog", 3: "2", 4: "blue"}
    types = {1: "what is", 2: "what is", 3: "how many", 4: ""}
    kinds = {1: "other", 2: "other", 3: "number", 4: "other"}
    scores = vqa_score(predictions, answers, types, kinds)
    assert scores["accuracy"] == pytest.approx(100 * (1.0 + 0.3 + 0.6 + 0.0) / 4)
    assert scores["accuracy/what is"] == pytest.approx(100 * (1.0 + 0.3) / 2)
    assert scores["accuracy/how many"] == pytest.approx(60.0)
    assert "accuracy/" not in scores  # an empty type counts in the overall only
    assert scores["accuracy/answer_type/other"] == pytest.approx(100 * 1.3 / 3)
    assert scores["accuracy/answer_type/number"] == pytest.approx(60.0)
    assert set(vqa_score(predictions, answers)) == {"accuracy"}


def test_vqa_score_refuses_mismatched_question_ids():
    with pytest.raises(ValueError, match="without a prediction: \\[2\\]"):
        vqa_score({1: "cat"}, {1: ["cat"] * 10, 2: ["dog"] * 10})


# --- VQA training targets and vocabulary --------------------------------------------------------------------------

def test_soft_targets_are_min_one_count_over_three_of_normalised_answers():
    vocab = {"2": 0, "3": 1, "few": 2, "many": 3}
    answers = ["2", "two", "Two.", "2", "three", "3", "a few", "lots", "lots", "lots"]
    targets = soft_targets(answers, vocab)
    assert targets == {0: 1.0, 1: pytest.approx(2 / 3), 2: pytest.approx(1 / 3)}  # "lots" is not in the vocabulary
    # Not the leave-one-out accuracy: one annotator gives 1/3 here, 0.3 there.
    assert vqa_accuracy("few", answers) == pytest.approx(0.3)


def test_answer_vocab_is_most_frequent_normalised_with_alphabetical_ties():
    lists = [["Yes", "yes", "yes."], ["no", "No"], ["two", "2"], ["blue", "red"], ["the"]]
    assert answer_vocab(lists, top_k=3) == ["yes", "2", "no"]        # 3, then 2 and 2 tied: "2" < "no"
    assert answer_vocab(lists, top_k=10) == ["yes", "2", "no", "blue", "red"]  # "the" -> "" is left out
    assert answer_vocab(iter(lists), top_k=1) == ["yes"]              # any iterable, read once
    with pytest.raises(ValueError):
        answer_vocab(lists, top_k=0)
