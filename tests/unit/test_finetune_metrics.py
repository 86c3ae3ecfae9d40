"""Golden tests of the task metrics: VQA accuracy on hand-worked cases, caption metrics against pycocoevalcap's own
COCOEvalCap run, retrieval recall per sample and per distinct caption text."""
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


# --- Caption metrics ----------------------------------------------------------------------------------------------

needs_java = pytest.mark.skipif(shutil.which("java") is None,
                                reason="java is not on PATH (pycocoevalcap's tokenizer and METEOR are Java programs)")

REFERENCES = {
    3: ["A brown dog runs across a grassy field.", "A dog running on the grass.", "The brown dog is running outside.",
        "A puppy sprints through a green field.", "A dog plays in a park on a sunny day."],
    7: ["Two people ride bicycles down a city street.", "A pair of cyclists on a busy road.",
        "Two bikers riding next to cars.", "People cycling along a street in town.", "Two men on bikes in traffic."],
    11: ["A plate of pasta with tomato sauce.", "Spaghetti and sauce served on a white plate.",
         "A bowl of noodles covered in red sauce.", "Pasta dinner on a table.", "A close-up of a spaghetti dish."],
    12: ["A red bus parked at the curb.", "A double-decker bus on a London street.", "A big red bus waits for riders.",
         "The bus is stopped by the sidewalk.", "A red passenger bus near a building."],
    20: ["A cat sleeping on a couch.", "A grey cat naps on the sofa.", "The kitten is curled up on a cushion.",
         "A cat lying on a living room couch.", "A sleepy cat resting on furniture."],
    31: ["A man surfing a large wave.", "A surfer rides a wave in the ocean.", "Someone on a surfboard in the sea.",
         "A person catching a wave on a board.", "A surfer in a wetsuit on a blue wave."],
}
PREDICTIONS = {
    3: "a brown dog running across a field",
    7: "Two people riding bikes on a street.",
    11: "a plate of spaghetti with sauce",
    12: "A red bus parked at the curb.",          # one of the references, word for word
    20: "a dog sitting on a bed",                # mostly wrong
    31: "",                                      # an empty caption (a decoder that ends at once)
}


def _children() -> set[int]:
    """Pids of the live child processes of this process."""
    import os
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == os.getpid():
                pids.add(int(entry))
    return pids


def _cocoevalcap(tmp_path, monkeypatch, predictions, references) -> dict[str, float]:
    """pycocoevalcap's own evaluation: COCO objects from an annotation file and a results file, then COCOEvalCap
    with SPICE replaced by a stub (it would download CoreNLP)."""
    import pycocoevalcap.eval
    from pycocoevalcap.eval import COCOEvalCap
    from pycocotools.coco import COCO

    class NoSpice:
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    monkeypatch.setattr(pycocoevalcap.eval, "Spice", NoSpice)
    annotations = {"info": {}, "licenses": [], "type": "captions",
                   "images": [{"id": i} for i in references],
                   "annotations": [{"image_id": i, "id": 100 * i + k, "caption": c}
                                   for i, refs in references.items() for k, c in enumerate(refs)]}
    (tmp_path / "captions.json").write_text(json.dumps(annotations))
    (tmp_path / "results.json").write_text(json.dumps([{"image_id": i, "caption": c} for i, c in predictions.items()]))
    coco = COCO(str(tmp_path / "captions.json"))
    evaluator = COCOEvalCap(coco, coco.loadRes(str(tmp_path / "results.json")))
    evaluator.evaluate()
    names = {"Bleu_1": "BLEU-1", "Bleu_2": "BLEU-2", "Bleu_3": "BLEU-3", "Bleu_4": "BLEU-4", "METEOR": "METEOR",
             "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr"}
    return {names[k]: v for k, v in evaluator.eval.items() if k in names}


@needs_java
def test_caption_scores_equal_pycocoevalcaps_own_evaluation(tmp_path, monkeypatch):
    from finetune.metrics.caption import METRICS, caption_scores

    before = _children()
    ours = caption_scores(PREDICTIONS, REFERENCES)
    assert _children() == before  # METEOR's Java process is stopped, not left for the garbage collector
    reference = _cocoevalcap(tmp_path, monkeypatch, PREDICTIONS, REFERENCES)
    assert list(ours) == METRICS and set(reference) == set(METRICS)
    for name in METRICS:
        assert ours[name] == pytest.approx(reference[name], abs=1e-9), name
    assert 0.1 < ours["BLEU-1"] < 1 and 0 < ours["CIDEr"]  # a real score, not a degenerate 0 or 1


@needs_java
def test_a_right_caption_scores_higher_than_a_wrong_one():
    from finetune.metrics.caption import caption_scores

    ids = list(REFERENCES)
    right = {i: REFERENCES[i][0] for i in ids}
    # Each image gets the first reference of the next image.
    wrong = {i: REFERENCES[ids[(k + 1) % len(ids)]][0] for k, i in enumerate(ids)}
    good, bad = caption_scores(right, REFERENCES), caption_scores(wrong, REFERENCES)
    for name in good:
        assert good[name] > bad[name], name


def test_caption_inputs_are_checked_and_results_are_in_coco_format():
    from finetune.metrics.caption import caption_scores, coco_results

    assert coco_results({7: "b", 3: "a"}) == [{"image_id": 3, "caption": "a"}, {"image_id": 7, "caption": "b"}]
    with pytest.raises(ValueError, match="without a prediction: \\[7\\]"):
        caption_scores({3: "a dog"}, {3: ["a dog"], 7: ["a cat"]})
    with pytest.raises(ValueError, match="without reference captions: \\[3\\]"):
        caption_scores({3: "a dog"}, {3: []})


# --- Retrieval with repeated captions -----------------------------------------------------------------------------

# Samples 0-2 are captioned "a red circle" (text embedding RED), sample 3 "a blue square" (BLUE); images 1 and 3 are
# the same point, so every similarity below is one coordinate of an image, exact in float.
RED, BLUE = [1.0, 0.0], [0.0, 1.0]
IMAGES = [[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.8, 0.6]]
CAPTIONS = ["a red circle"] * 3 + ["a blue square"]


def test_distinct_texts_group_the_samples_by_caption_string():
    from finetune.tasks.retrieval import distinct_texts

    first, samples_of, texts_of = distinct_texts(CAPTIONS, [0, 1, 2, 3], 4)
    assert first == [0, 3]
    assert [s.tolist() for s in samples_of] == [[0, 1, 2], [3]]
    assert [t.tolist() for t in texts_of] == [[0], [0], [0], [1]]


def test_recall_per_distinct_text_differs_from_recall_per_sample():
    import torch

    from finetune.tasks.retrieval import distinct_texts, recall_at_k

    images, texts = torch.tensor(IMAGES), torch.tensor([RED] * 3 + [BLUE])
    own = [torch.tensor([i]) for i in range(4)]
    # Per sample. Image 2 (own text 0.6) has BLUE (0.8) above it; image 3 (own BLUE 0.6) has the three RED rows
    # (0.8) above it: rank 3, a miss even at k=2. Caption 1 (own image 0.8) has image 0 (1.0) above it; caption 2
    # (own 0.6) has images 0, 1 and 3; caption 3 (own 0.6) has image 2 (0.8). Ties count for the query.
    assert recall_at_k(images, texts, own, ks=(1, 2)) == {"R@1": 50.0, "R@2": 75.0}
    assert recall_at_k(texts, images, own, ks=(1, 2)) == {"R@1": 25.0, "R@2": 75.0}
    # Per distinct text: RED hits with image 0; the repeated RED takes one slot above image 3's BLUE, not three.
    first, samples_of, texts_of = distinct_texts(CAPTIONS, [0, 1, 2, 3], 4)
    assert recall_at_k(images, texts[first], texts_of, ks=(1, 2)) == {"R@1": 50.0, "R@2": 100.0}
    assert recall_at_k(texts[first], images, samples_of, ks=(1, 2)) == {"R@1": 50.0, "R@2": 100.0}


def _retrieval_task():
    from finetune.config import FinetuneConfig
    from finetune.tasks import TaskContext, build_task
    from mmfuse.config import load_config

    cfg = load_config(FinetuneConfig, overrides=["task=retrieval", "checkpoint=c", "data.eval=x", "run.dir=r"])
    return build_task(cfg, None, TaskContext(None, None, None))  # scoring reads only the records


def test_retrieval_reports_distinct_text_rows_beside_the_per_sample_ones(tmp_path):
    import torch

    task = _retrieval_task()
    texts = torch.tensor([RED] * 3 + [BLUE])
    records = [{"key": f"s{i}", "image": torch.tensor(IMAGES[i]), "text": texts[i], "caption": CAPTIONS[i]}
               for i in range(4)]
    metrics = task.score(records)
    assert metrics["image_to_text/R@1"] == 50.0 and metrics["text_to_image/R@1"] == 25.0  # meaning unchanged
    assert metrics["unique_text/image_to_text/R@1"] == 50.0 and metrics["unique_text/text_to_image/R@1"] == 50.0
    assert metrics["mean_recall"] == pytest.approx((50 + 100 + 100 + 25 + 100 + 100) / 6)  # per-sample rows only
    chance = task.chance()
    # RED has 3 of the 4 images (a random top-1 hits with 3/4), BLUE 1 of 4; an image query has 1 of 2 texts.
    assert chance["unique_text/text_to_image/R@1"] == pytest.approx(50.0)
    assert chance["unique_text/image_to_text/R@1"] == pytest.approx(50.0)
    card = "\n".join(task.details(records, tmp_path))
    assert "4 samples, 4 captions, 2 distinct" in card
    assert "`unique_text/text_to_image/R@k`" in card and "`text_to_image/R@k`" in card
    # Every reference caption in the gallery (COCO's protocol) gives the same rows for one caption per sample.
    with_references = [{"key": r["key"], "image": r["image"], "text": r["text"], "captions": r["text"][None],
                        "references": [r["caption"]]} for r in records]
    assert task.score(with_references) == metrics
    # Captions that never repeat: the per-sample rows alone, and no section in the card.
    distinct = [{**r, "caption": f"caption {i}"} for i, r in enumerate(records)]
    assert not [k for k in task.score(distinct) if k.startswith("unique_text/")]
    assert task.details(distinct, tmp_path) == []
