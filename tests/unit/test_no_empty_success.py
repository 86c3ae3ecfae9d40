"""Never an empty success, never a lost checkpoint: VQA image names, the end-of-run order of save and evaluation,
a training step with no usable sample."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from finetune.records import read_records, vqa_image_names
from mmfuse.config import ConfigError, load_config


def vqa_files(tmp_path, **questions_extra):
    questions = {"questions": [{"question_id": 7, "image_id": 42, "question": "what colour?"}], **questions_extra}
    annotations = {"annotations": [{"question_id": 7, "answers": [{"answer": "red"}]}]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    return str(tmp_path / "q.json"), str(tmp_path / "a.json")


def test_vqa_image_names_follow_the_images_list_the_template_or_cocos_naming(tmp_path):
    questions, annotations = vqa_files(tmp_path)
    with pytest.raises(ValueError, match="no file name for image 42 .*set data.image_template"):
        read_records(questions, "vqa", str(tmp_path / "img"), annotations)  # was "/COCO__000000000042.jpg"
    [record] = read_records(questions, "vqa", str(tmp_path / "img"), annotations, "{image_id}.png")
    assert record.image == f"{tmp_path}/img/42.png"  # relative to data.*_images, not the file system root
    assert vqa_image_names({"data_subtype": "val2014"}, "", "q.json")(42) == "val2014/COCO_val2014_000000000042.jpg"
    assert vqa_image_names({"images": [{"id": 42, "file_name": "a.jpg"}]}, "{image_id}.png", "q.json")(42) == "a.jpg"


def test_an_image_template_with_unknown_fields_is_a_config_error():
    from finetune.config import FinetuneConfig

    overrides = ["task=vqa", "checkpoint=x", "data.eval=y", "run.dir=z"]
    assert load_config(FinetuneConfig, [], [*overrides, "data.image_template='{image_id:06d}.jpg'"])
    with pytest.raises(ConfigError, match="data.image_template='{id}.jpg' must use only"):
        load_config(FinetuneConfig, [], [*overrides, "data.image_template='{id}.jpg'"])


def stub_trainer(tmp_path, samples: int, evaluate):
    """A pre-training Trainer with its loop intact and every collaborator a stub."""
    from pretrain.config import PretrainConfig
    from pretrain.step import StepResult
    from pretrain.trainer import Trainer

    cfg = load_config(PretrainConfig, [], ["data.train=x", "data.eval=y", f"run.dir={tmp_path}", "run.steps=2",
                                           "run.checkpoint_every=0", "run.log_every=1", "run.eval_untrained=false"])
    trainer = Trainer.__new__(Trainer)
    calls: list[str] = []
    trainer.cfg, trainer.step, trainer.samples_seen = cfg, 0, 0
    trainer.topo = SimpleNamespace(is_main=False)
    trainer.loader = SimpleNamespace(wait_seconds=0.0, metrics=lambda: {"samples": 0, "image_decode_failed": 8},
                                     sources=[SimpleNamespace(shards=[SimpleNamespace(url="s3://b/shard-0.tar?sig=secret")])])
    trainer.metrics = SimpleNamespace(close=lambda: calls.append("close"))
    trainer.batches = lambda: iter(())
    trainer.train_step = lambda data: StepResult({}, samples=samples, local_samples=samples)
    trainer.log_metrics = lambda losses, window, wait: {"loss": 1.0}
    trainer.save = lambda: calls.append(f"save {trainer.step}")
    trainer.evaluate = lambda: (calls.append(f"evaluate {trainer.step}"), evaluate())[1]
    trainer.report_skipped = lambda: calls.append("report")
    return trainer, calls


def test_the_final_checkpoint_is_committed_before_the_end_evaluation_which_may_fail(tmp_path):
    def broken():
        raise RuntimeError("eval shards vanished")

    trainer, calls = stub_trainer(tmp_path, samples=8, evaluate=broken)
    with pytest.raises(RuntimeError, match="eval shards vanished"):
        trainer.run()
    assert calls == ["save 2", "evaluate 2"]  # saved first; the failure stops the run (non-zero exit) after it


def test_a_step_without_any_usable_sample_stops_the_run(tmp_path):
    trainer, calls = stub_trainer(tmp_path, samples=0, evaluate=dict)
    with pytest.raises(ValueError, match=r"data.train yielded no usable sample in step 1 .*image_decode_failed=8; "
                                         r"shards s3://b/shard-0.tar\?<redacted>\)"):
        trainer.run()
    assert calls == []  # no checkpoint of an untrained model, no evaluation
