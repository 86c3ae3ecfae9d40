"""VQA's diagnostics: the text-only prior, the answers without the image and the per-type table."""

import torch

from finetune.tasks.vqa import AnswerPrior, answer_all, score_records, type_table

TRAIN = [
    {"question": "what color is the star?", "question_type": "color", "answers": ["red"] * 7 + ["blue"] * 3},
    {"question": "what color is the star?", "question_type": "color", "answers": ["red"] * 10},
    {"question": "what color is the circle?", "question_type": "color", "answers": ["Blue"] * 10},
    {"question": "how many shapes are there?", "question_type": "count", "answers": ["two"] * 6 + ["3"] * 4},
    {"question": "no answers here", "question_type": "count"},
]


def test_prior_answers_by_question_then_type_then_overall():
    prior = AnswerPrior(TRAIN)
    assert prior("What color is the star? ", "color") == "red"  # same question string (case, spaces aside)
    assert prior("what color is the circle?", "color") == "blue"  # normalised answers
    assert prior("what color is the square?", "color") == "red"  # unseen question: its type's most frequent
    assert prior("how many circles are there?", "count") == "2"  # "two" normalises to "2"
    assert prior("is it raining?", "weather") == "red"  # unknown type: the most frequent answer overall


def batch_of(questions, types, answers):
    n = len(questions)
    return {"__key__": [str(i) for i in range(n)], "question": questions, "question_type": types,
            "question_id": list(range(n)), "answers": answers,
            "image": torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 4, 4).clone() + 1,
            "has_image": torch.ones(n, dtype=torch.bool)}


def test_answers_with_a_blank_image_and_the_prior_are_scored_beside_the_models():
    # A "model" that answers from the image: the image's value picks the colour; a blank image gives "green".
    def answer(images, questions):
        return [{1.0: "red", 2.0: "blue", 0.0: "green"}[float(img.mean())] for img in images]

    batch = batch_of(["what color is the star?", "what color is the circle?", None],
                     ["color", "color", "color"], [["red"] * 10, ["blue"] * 10, None])
    records = answer_all(batch, answer, AnswerPrior(TRAIN))
    assert [r["key"] for r in records] == ["0", "1"]  # the row without a question is skipped
    assert [(r["answer"], r["without_image"], r["prior"]) for r in records] == [("red", "green", "red"),
                                                                              ("blue", "green", "blue")]
    metrics = score_records(records)
    assert metrics["accuracy"] == 100.0 and metrics["without_image/accuracy"] == 0.0
    assert metrics["prior/accuracy"] == 100.0 and metrics["changed_without_image"] == 100.0
    assert metrics["accuracy/color"] == 100.0 and metrics["without_image/accuracy/color"] == 0.0


def test_type_table_lists_every_type_with_and_without_the_image():
    records = [
        {"question_id": 1, "answers": ["red"] * 10, "answer": "red", "without_image": "red", "prior": "red",
         "question_type": "color", "answer_type": "other"},
        {"question_id": 2, "answers": ["2"] * 10, "answer": "2", "without_image": "3", "prior": "3",
         "question_type": "count", "answer_type": "number"},
    ]
    metrics = score_records(records)
    assert metrics["changed_without_image"] == 50.0
    assert metrics["accuracy/answer_type/number"] == 100.0 and metrics["prior/accuracy/count"] == 0.0
    table = "\n".join(type_table(metrics))
    assert "| **all** | 100.0 | 50.0 | 50.0 |" in table
    assert "| count | 100.0 | 0.0 | 0.0 |" in table and "| answer: number | 100.0 | 0.0 | 0.0 |" in table
    assert "change without the image: 50.0%" in table
