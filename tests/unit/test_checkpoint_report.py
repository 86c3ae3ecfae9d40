import json

import pytest

from mmfuse.commits import MARKER, committed_tags
from pretrain.checkpoint import CheckpointManager, saved_zero_stage
from pretrain.report import format_report, last_eval, untrained_eval


def make_tag(root, step, committed=True, world_size=2, zero_stage=2):
    folder = root / "checkpoints" / f"step_{step:06d}"
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"partial" if not committed else b"whole")
    if committed:
        (folder / MARKER).write_text(json.dumps({"step": step, "world_size": world_size, "zero_stage": zero_stage}))


def test_a_save_that_crashed_is_never_selected(tmp_path):
    make_tag(tmp_path, 100)
    make_tag(tmp_path, 200)
    make_tag(tmp_path, 300, committed=False)  # the crash happened mid-save: no marker
    (tmp_path / "checkpoints" / "latest").write_text("step_000300")  # DeepSpeed's own pointer is not trusted
    manager = CheckpointManager(tmp_path, keep=3, rank=0, world_size=2, zero_stage=2)
    assert committed_tags(tmp_path / "checkpoints") == ["step_000100", "step_000200"]
    assert manager.resolve("auto") == (tmp_path / "checkpoints", "step_000200")
    assert not manager.check_resume_layout(manager.resolve("auto"))
    assert manager.resolve("none") is None
    with pytest.raises(ValueError, match="not a committed checkpoint"):
        manager.resolve(str(tmp_path / "checkpoints" / "step_000300"))


@pytest.mark.parametrize("saved, here, universal", [
    ((2, 2), (2, 2), False), ((2, 2), (1, 2), True), ((1, 3), (2, 3), True), ((2, 1), (1, 2), True),
    ((2, 1), (2, 2), False),  # stages 1 and 2 read each other's shards as they are
    ((2, 0), (1, 0), False),  # stage 0 keeps everything whole: it loads at any world size as it is
    ((2, 2), (2, 3), None), ((2, 3), (2, 1), None), ((2, 0), (2, 2), None)])  # None: refused
def test_another_layout_loads_through_a_universal_checkpoint_within_what_deepspeed_can_convert(
        tmp_path, saved, here, universal):
    make_tag(tmp_path, 100, world_size=saved[0], zero_stage=saved[1])
    where = (tmp_path / "checkpoints", "step_000100")
    manager = CheckpointManager(tmp_path, keep=3, rank=0, world_size=here[0], zero_stage=here[1])
    if universal is None:
        with pytest.raises(ValueError, match=f"written with ZeRO stage {saved[1]}.*engine.zero_stage={saved[1]}"):
            manager.check_resume_layout(where)
    else:
        assert manager.check_resume_layout(where) is universal


@pytest.mark.parametrize("files, stage", [(["zero_pp_rank_0_mp_rank_00_model_states.pt"], 3),
                                          (["zero_pp_rank_0_mp_rank_00_optim_states.pt"], 2), ([], 0)])
def test_a_marker_without_a_stage_is_read_from_deepspeeds_file_names(tmp_path, files, stage):
    make_tag(tmp_path, 100)
    folder = tmp_path / "checkpoints" / "step_000100"
    (folder / MARKER).write_text(json.dumps({"step": 100, "world_size": 2}))  # as written before the stage was
    for name in files:
        (folder / name).write_bytes(b"")
    assert saved_zero_stage(folder) == stage


def test_prune_keeps_newest_and_drops_stale_partials(tmp_path):
    for step in (10, 20, 30, 40):
        make_tag(tmp_path, step)
    make_tag(tmp_path, 35, committed=False)
    make_tag(tmp_path, 50, committed=False)  # a save in flight after the newest: left alone
    (tmp_path / "checkpoints" / "step_000010_universal").mkdir()  # a resume's conversion goes with its checkpoint
    CheckpointManager(tmp_path, keep=2, rank=0, world_size=1, zero_stage=2)._prune("step_000040")
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == ["step_000030", "step_000040", "step_000050"]


@pytest.fixture
def one_rank_group(tmp_path):
    """A real one-process gloo group: the manager's barriers need one."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside_intact(tmp_path, one_rank_group):
    for step in (100, 200, 300):
        make_tag(tmp_path, step)
    manager = CheckpointManager(tmp_path, keep=1, rank=0, world_size=1, zero_stage=2)
    root = tmp_path / "checkpoints"
    assert manager.set_aside_newer(100, tmp_path / "elsewhere") == []  # another run's checkpoint: nothing here moves
    assert manager.set_aside_newer(100, root) == ["step_000200", "step_000300"]
    assert (root / "latest_committed").read_text() == "step_000100"
    assert committed_tags(root) == ["step_000100"] and manager.resolve("auto") == (root, "step_000100")
    aside = sorted(p.name for p in root.iterdir() if ".abandoned-" in p.name)
    assert [name.split(".")[0] for name in aside] == ["step_000200", "step_000300"]
    assert all((root / name / "mp_rank_00_model_states.pt").read_bytes() == b"whole" for name in aside)
    manager._prune("step_000200")  # the resumed run's next save: nothing set aside is pruned
    assert sorted(p.name for p in root.iterdir() if ".abandoned-" in p.name) == aside


def test_a_tag_saved_again_is_uncommitted_while_it_is_rewritten(tmp_path, one_rank_group):
    class FullDisk:  # the engine's save failing half-way, after the old marker's folder was reused
        def save(self, root, tag, client):
            (tmp_path / "checkpoints" / tag / "mp_rank_00_model_states.pt").write_bytes(b"partial")
            raise OSError(28, "No space left on device")

    make_tag(tmp_path, 100)
    make_tag(tmp_path, 200)
    manager = CheckpointManager(tmp_path, keep=3, rank=0, world_size=1, zero_stage=2)
    with pytest.raises(OSError, match="No space left"):
        manager.save(FullDisk(), 200, {}, {})
    assert manager.resolve("auto") == (tmp_path / "checkpoints", "step_000100")


def test_report_shows_metrics_next_to_chance(tmp_path):
    rows = [{"step": 5, "loss": 3.0},
            {"step": 10, "eval/samples": 200.0, "eval/zeroshot/image/top1": 41.5, "eval/zeroshot/chance_top1": 3.3,
             "eval/retrieval/image_to_text/R@1": 12.0, "eval/retrieval/image_to_text/R@10": 50.0}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    text = format_report(last_eval(tmp_path))
    assert "step 10 on 200 held-out samples" in text
    assert "image" in text and "41.5" in text and "3.3" in text
    assert "image → text" in text and "12.0" in text and "0.50" in text  # chance R@1 = 1/200


def test_report_puts_the_untrained_model_beside_the_trained_one(tmp_path):
    rows = [{"step": 0, "eval/samples": 200.0, "eval/zeroshot/image/top1": 4.0, "eval/zeroshot/chance_top1": 3.3,
             "eval/retrieval/image_to_text/R@1": 0.5, "eval/retrieval/image_to_text/R@10": 5.0},
            {"step": 10, "eval/samples": 200.0, "eval/zeroshot/image/top1": 41.5, "eval/zeroshot/chance_top1": 3.3,
             "eval/retrieval/image_to_text/R@1": 12.0, "eval/retrieval/image_to_text/R@10": 50.0}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert untrained_eval(tmp_path)["step"] == 0
    lines = format_report(last_eval(tmp_path), untrained_eval(tmp_path)).splitlines()
    assert "untrained %" in lines[2]
    assert lines[3].split() == ["image", "41.5", "4.0", "3.3"]
    assert [line for line in lines if "image → text" in line][0].split()[-4:] == ["12.0", "50.0", "0.5", "0.50"]
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rows[1]))  # a run without the step-0 evaluation
    assert untrained_eval(tmp_path) is None and "untrained" not in format_report(last_eval(tmp_path), None)


def test_a_resume_drops_the_records_after_its_checkpoint_from_metrics_and_tensorboard(tmp_path):
    """Steps 1-10 were logged before a crash (the last line torn); the run resumes from step 5's checkpoint."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mmfuse.tracking import MetricsLogger

    first = MetricsLogger(tmp_path, enabled=True)
    for step in range(1, 11):
        first.log(step, {"loss": float(step)})
    first.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 11, "lo')
    second = MetricsLogger(tmp_path, enabled=True)
    second.resume_at(5)
    for step in range(6, 8):
        second.log(step, {"loss": 100.0 + step})
    second.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(s, float(s)) for s in range(1, 6)] + [(6, 106.0), (7, 107.0)]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(s, float(s)) for s in range(1, 6)] + [(6, 106.0), (7, 107.0)]
