"""The standard VQA accuracy, as the official VQA v2 evaluation script (GT-Vision-Lab/VQA, ``vqaEval.py``) computes
it, plus the answer vocabulary and soft targets used to train a VQA classifier.

Two different "soft" scores live here; do not mix them up:

- ``vqa_accuracy`` (evaluation, official): with the annotators' answers a_1..a_n, the accuracy of a prediction is
  the mean over the n leave-one-out subsets of min(1, matches / 3), where matches counts the answers in the subset
  equal to the prediction. With n = 10 and k matching annotators this is 0, 0.3, 0.6, 0.9, 1.0 for
  k = 0, 1, 2, 3, >= 4.
- ``soft_targets`` (training): min(1, k / 3) for each answer given by k annotators, i.e. 0, 1/3, 2/3, 1, 1 for
  k = 0, 1, 2, 3, >= 4, without leave-one-out.

Rules of the official script that this module keeps on purpose, so that numbers match it:

- Answers are normalised (``normalize_answer``) only when the annotators disagree. When all the answers of a
  question are the same string, prediction and answers are compared as they are, after trimming whitespace (case
  and punctuation count). Normalising predictions before scoring (as the official training code does with its
  answer vocabulary) avoids losing points to this.
- Normalisation: ``\\n`` and ``\\t`` become spaces and the ends are trimmed; each of ``; / [ ] " { } ( ) = + \\ _ - > <
  @ ` , ? !`` is deleted if it touches a space in the text, or if the text contains a comma between two digits
  anywhere, and replaced by a space otherwise; a period not followed by a digit is deleted (the script's period
  pattern tries to protect a period after a digit too, but is written as a lookahead, so it does not; and its
  ``re.UNICODE`` lands in ``sub``'s ``count`` argument, so at most 32 periods go); then the text is lower-cased,
  split on whitespace, number words "none"/"zero".."ten" become digits, the articles a/an/the are dropped, and
  the contraction table below is applied word by word (after lower-casing, so its capitalised keys never match).

Fewer than 10 answers: the same formula over however many there are (the script averages over ``len(answers)``
leave-one-out subsets too), so with n answers a full match scores min(1, (n - 1) / 3). A single answer is
refused: leaving it out leaves nothing to match, and the script would score every prediction 0.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Hashable, Iterable

_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                "!"]
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")
_PERIODS_REMOVED = 32  # the official script passes re.UNICODE (= 32) where re.sub expects count
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# The official table, entries unchanged (including "somebody'd" -> "somebodyd" and the capitalised keys).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}


def _trim(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _punctuation(text: str) -> str:
    # Decided on the text as it came in, not as it is being rewritten, like the official script.
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in _PUNCTUATION:
        out = out.replace(p, "" if delete_all or p + " " in text or " " + p in text else " ")
    return _PERIOD.sub("", out, count=_PERIODS_REMOVED)


def _digits_articles(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(answer: str) -> str:
    """The official answer normalisation: whitespace, punctuation, lower case, number words, articles, contractions."""
    return _digits_articles(_punctuation(_trim(answer)))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Accuracy in [0, 1] of one predicted answer against the annotators' answers (normally 10), as the official
    script scores one question (see the module docstring for the formula and its quirks)."""
    if len(answers) < 2:
        raise ValueError(f"VQA accuracy needs at least 2 annotator answers (leave-one-out), got {len(answers)}")
    answers = [_trim(a) for a in answers]
    prediction = _trim(prediction)
    if len(set(answers)) > 1:
        answers = [normalize_answer(a) for a in answers]
        prediction = normalize_answer(prediction)
    # Leaving annotator i out removes one matching answer exactly when annotator i matched.
    matches = sum(a == prediction for a in answers)
    total = sum(min(1.0, (matches - (a == prediction)) / 3) for a in answers)
    return total / len(answers)


def vqa_score(predictions: dict[Hashable, str], answers: dict[Hashable, list[str]],
              question_types: dict[Hashable, str] | None = None,
              answer_types: dict[Hashable, str] | None = None) -> dict[str, float]:
    """Accuracy in percent over all questions (``"accuracy"``) and per question type (``"accuracy/<type>"``) and
    answer type (``"accuracy/answer_type/<type>"``) where those are given; questions whose type is missing or empty
    count in the overall number only. The official script rounds to 2 decimals; this does not round.

    ``predictions`` and ``answers`` must cover the same question ids (the official script refuses anything else)."""
    if predictions.keys() != answers.keys():
        missing = [q for q in answers if q not in predictions][:5]
        extra = [q for q in predictions if q not in answers][:5]
        raise ValueError(f"predictions and answers must have the same question ids; "
                         f"without a prediction: {missing}, without answers: {extra} (first 5 of each)")
    if not answers:
        raise ValueError("no questions to score")
    accuracy = {qid: vqa_accuracy(predictions[qid], answers[qid]) for qid in answers}
    scores = {"accuracy": 100.0 * sum(accuracy.values()) / len(accuracy)}
    for prefix, types in (("accuracy/", question_types), ("accuracy/answer_type/", answer_types)):
        groups: dict[str, list[float]] = {}
        for qid, acc in accuracy.items():
            kind = (types or {}).get(qid)
            if kind:
                groups.setdefault(kind, []).append(acc)
        scores.update({prefix + kind: 100.0 * sum(accs) / len(accs) for kind, accs in sorted(groups.items())})
    return scores


def soft_targets(answers: list[str], vocab: dict[str, int]) -> dict[int, float]:
    """Training target of one question: {vocabulary index: min(1, k / 3)} for each vocabulary answer given by k of
    the annotators (after ``normalize_answer``, always; answers outside the vocabulary are dropped). This is the
    common BCE target, not the leave-one-out accuracy: 1 or 2 matching annotators give 1/3 or 2/3 here and
    0.3 or 0.6 in ``vqa_accuracy``."""
    counts = Counter(normalize_answer(a) for a in answers)
    return {vocab[a]: min(1.0, k / 3) for a, k in counts.items() if a in vocab}


def answer_vocab(answer_lists: Iterable[list[str]], top_k: int) -> list[str]:
    """The ``top_k`` most frequent normalised answers, counting every annotator's answer; ties go to the
    alphabetically first answer. Answers that normalise to the empty string (e.g. "the") are left out."""
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    counts = Counter(normalize_answer(a) for answers in answer_lists for a in answers)
    counts.pop("", None)
    return [a for a, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:top_k]]
