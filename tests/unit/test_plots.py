"""Learning curves, confusion matrices, per-class recall and the results cards that link them."""

import json

import pytest

from mmfuse.plots import confusion_matrix, curves, eval_keys, learning_curves, read_metrics

PNG = b"\x89PNG\r\n\x1a\n"


def write_metrics(path, rows, torn=False):
    text = "\n".join(json.dumps(r) for r in rows) + "\n"
    path.write_text(text + ('{"step": 99, "lo' if torn else ""))


def run_rows():
    rows = []
    for step in range(10, 110, 10):
        rows.append({"step": step, "loss": 5.0 / step, "loss/contrastive/image_text": 4.0 / step,
                     "loss/masked_image": 1.0 / step, "lr": 1e-3, "samples_seen": 32 * step})
    rows.append({"step": 50, "eval/samples": 256.0, "eval/zeroshot/image/top1": 30.0,
                 "eval/zeroshot/chance_top1": 3.3, "eval/retrieval/image_to_text/R@1": 9.0,
                 "eval/retrieval/image_to_text/R@10": 30.0})
    rows.append({"step": 100, "eval/samples": 256.0, "eval/zeroshot/image/top1": 45.0,
                 "eval/zeroshot/chance_top1": 3.3, "eval/retrieval/image_to_text/R@1": 15.0,
                 "eval/retrieval/image_to_text/R@10": 40.0})
    return rows


def test_curves_keep_every_finite_metric_by_step_and_skip_a_torn_last_line(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl", run_rows() + [{"step": 110, "loss": float("nan")}], torn=True)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert len(rows) == 13  # the torn line is gone
    series = curves(rows)
    assert series["loss"][0] == list(range(10, 110, 10))  # the NaN at step 110 is not drawn
    assert series["eval/zeroshot/image/top1"] == ([50, 100], [30.0, 45.0])
    # the eval panel shows headline figures, not chance or sample counts
    assert eval_keys(series) == ["eval/retrieval/image_to_text/R@1", "eval/zeroshot/image/top1"]


def test_learning_curves_write_a_png_and_nothing_for_an_empty_log(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl", run_rows())
    out = learning_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png", title="t")
    assert out == tmp_path / "curves.png" and out.read_bytes().startswith(PNG)
    (tmp_path / "empty.jsonl").write_text('{"step": 0}\n')
    assert learning_curves(tmp_path / "empty.jsonl", tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_confusion_matrix_png_takes_classes_that_were_never_predicted(tmp_path):
    out = confusion_matrix([0, 1, 2, 2], [0, 2, 2, 1], ["red circle", "blue square", "green star"],
                           tmp_path / "sub" / "confusion.png", title="zs")
    assert out.read_bytes().startswith(PNG)


def test_per_class_recall_names_classes_worst_first_with_the_class_they_are_taken_for():
    from finetune.tasks.zeroshot import per_class_recall

    names = ["cat", "dog", "fox", "owl"]
    labels = [0, 0, 0, 0, 1, 1, 2, 2]
    predicted = [0, 0, 0, 1, 2, 2, 2, 2]
    rows = per_class_recall(labels, predicted, names)
    assert rows == [("dog", 2, 0.0, "fox"), ("cat", 4, 75.0, "dog"), ("fox", 2, 100.0, "")]  # owl: no sample


def test_pretraining_card_links_the_curves_and_shows_final_losses_and_the_last_eval(tmp_path):
    from pretrain.report import write_card

    write_metrics(tmp_path / "metrics.jsonl", run_rows())
    card = write_card(tmp_path).read_text()
    assert (tmp_path / "curves.png").read_bytes().startswith(PNG)
    assert "![learning curves](curves.png)" in card
    assert "Steps: 100" in card and "masked_image 0.0100" in card
    assert "45.0" in card and "step 100 on 256 held-out samples" in card


def test_pretraining_card_without_any_eval_says_so(tmp_path):
    from pretrain.report import write_card

    write_metrics(tmp_path / "metrics.jsonl", [r for r in run_rows() if "loss" in r])
    card = write_card(tmp_path).read_text()
    assert "curves.png" in card and "Steps: 100" in card
    assert "eval" in card.lower()


@pytest.mark.parametrize("configured, release, expected", [
    (["a {}"], ["the {} of"], (["a {}"], "config")),
    ([], ["the {} of"], (["the {} of"], "release (pre-training eval.templates)")),
    ([], [], None),
])
def test_zero_shot_templates_come_from_config_then_release_then_clips_defaults(configured, release, expected):
    from finetune.checkpoint import Checkpoint
    from pretrain.evaluate import DEFAULT_TEMPLATES

    checkpoint = Checkpoint("r", "release", "0" * 64, "tiny", release)
    templates, source = checkpoint.zeroshot_templates(configured)
    if expected is None:
        assert templates == list(DEFAULT_TEMPLATES) and source.startswith("default")
    else:
        assert (templates, source) == expected
