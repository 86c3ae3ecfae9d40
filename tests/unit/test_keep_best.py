"""run.keep_best: the checkpoint an in-loop metric picks survives pruning and is what export releases by default."""

import json
from pathlib import Path

import pytest

from pretrain.checkpoint import CheckpointManager, read_best
from pretrain.export import ExportConfig, pick_checkpoint
from mmfuse.commits import MARKER, committed_tags, tag_for


def commit(root: Path, step: int) -> None:
    folder = root / tag_for(step)
    folder.mkdir(parents=True)
    (folder / MARKER).write_text(json.dumps({"step": step}))


def run_with_evaluations(tmp_path, metric: str, values: list[float], keep: int = 1) -> CheckpointManager:
    """Save and evaluate as the trainer does: commit step 100·i, prune to ``keep``, then consider its value."""
    manager = CheckpointManager(tmp_path, keep=keep, rank=0, world_size=1, zero_stage=0)
    for i, value in enumerate(values, start=1):
        commit(manager.root, 100 * i)
        manager._prune(tag_for(100 * i))
        manager.consider_best(100 * i, metric, value)
    return manager


def test_the_best_checkpoint_outlives_run_keep_and_the_newest_is_kept_too(tmp_path):
    manager = run_with_evaluations(tmp_path, "eval/zeroshot/image/top1", [10.0, 40.0, 30.0, 20.0])
    assert committed_tags(manager.root) == ["step_000200", "step_000400"]
    best = read_best(manager.root)
    assert (best["tag"], best["value"], best["evaluations"]) == ("step_000200", 40.0, 4)


def test_a_loss_is_better_lower_and_a_tie_keeps_the_earlier_step(tmp_path):
    manager = run_with_evaluations(tmp_path / "loss", "eval/text/loss", [3.0, 1.0, 1.0, 2.0])
    assert read_best(manager.root)["tag"] == "step_000200"
    manager = run_with_evaluations(tmp_path / "top1", "eval/zeroshot/image/top1", [5.0, 5.0])
    assert read_best(manager.root)["tag"] == "step_000100"


def test_a_best_set_aside_by_an_older_resume_is_forgotten(tmp_path):
    manager = run_with_evaluations(tmp_path, "eval/zeroshot/image/top1", [10.0, 40.0], keep=3)
    (manager.root / "step_000200").rename(manager.root / "step_000200.abandoned-x")
    assert read_best(manager.root) is None
    manager.consider_best(100, "eval/zeroshot/image/top1", 10.0)
    assert read_best(manager.root)["tag"] == "step_000100"


def test_only_rank_0_writes_the_record(tmp_path):
    manager = CheckpointManager(tmp_path, keep=1, rank=1, world_size=2, zero_stage=2)
    commit(manager.root, 100)
    assert manager.consider_best(100, "eval/zeroshot/image/top1", 1.0) is False
    assert not (manager.root / "best.json").exists()


@pytest.mark.parametrize("select, step, want", [
    ("auto", -1, "step_000200"), ("best", -1, "step_000200"), ("latest", -1, "step_000300"), ("auto", 300, "step_000300"),
])
def test_export_releases_the_best_unless_told_otherwise(tmp_path, select, step, want):
    manager = run_with_evaluations(tmp_path, "eval/zeroshot/image/top1", [1.0, 9.0, 3.0], keep=3)
    tag, why = pick_checkpoint(ExportConfig(run=str(tmp_path), select=select, step=step), manager.root,
                               committed_tags(manager.root))
    assert tag == want
    if want == "step_000200":
        assert why == "run.keep_best: zeroshot/image/top1 = 9, the best of 3 in-loop evaluations"


def test_export_select_best_without_a_record_names_the_way_out(tmp_path):
    root = tmp_path / "checkpoints"
    commit(root, 100)
    with pytest.raises(ValueError, match=r"no best checkpoint .*run.keep_best=METRIC.*select=latest exports the newest \(step_000100\)"):
        pick_checkpoint(ExportConfig(run=str(tmp_path), select="best"), root, committed_tags(root))
    assert pick_checkpoint(ExportConfig(run=str(tmp_path)), root, committed_tags(root)) == ("step_000100", "latest")
    with pytest.raises(ValueError, match="select must be auto, best or latest"):
        pick_checkpoint(ExportConfig(run=str(tmp_path), select="newest"), root, committed_tags(root))


def test_a_synced_run_keeps_its_best_checkpoint_and_record_remotely_too(tmp_path, s3_server, s3fs_client):
    """run.checkpoint_sync (moto's S3 on loopback) is pruned to run.keep as well: the best checkpoint survives
    there, and best.json is mirrored beside it."""
    remote = f"{s3_server['bucket']}/run"
    manager = CheckpointManager(tmp_path, keep=1, rank=0, world_size=1, zero_stage=0, sync_url=f"s3://{remote}")
    for i, value in enumerate([10.0, 40.0, 30.0, 20.0], start=1):
        commit(manager.root, 100 * i)
        (manager.root / tag_for(100 * i) / "model.pt").write_bytes(b"weights")
        manager._prune(tag_for(100 * i))
        manager._upload(tag_for(100 * i))
        manager.consider_best(100 * i, "eval/zeroshot/image/top1", value)
    assert manager.sync.committed() == committed_tags(manager.root) == ["step_000200", "step_000400"]
    assert json.loads(s3fs_client.cat(f"{remote}/best.json")) == json.loads((manager.root / "best.json").read_text())
    assert s3fs_client.cat(f"{remote}/latest_committed") == b"step_000400"
