"""Per-tower switches through the real trainer (1 process, DeepSpeed ZeRO-2 over gloo, fp32, tiny flavor)."""

import os

import pytest

from tests.integration.pretraining import metrics, pretrain

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
ONE_PROCESS = ("launch.nproc=1", "run.checkpoint_every=0")


def losses(run_dir):
    return [{k: v for k, v in row.items() if k.startswith("loss")} for row in metrics(run_dir)]


@pytest.fixture(scope="module")
def eager(shards, tmp_path_factory):
    """3 steps without either switch: the reference of both tests. (Steps 1-2 see only the first update, at a
    warmup learning rate that a 2-step run has too, so a 2-step run's losses are its first two.)"""
    run = tmp_path_factory.mktemp("towers") / "eager"
    pretrain(shards, run, "run.steps=3", *ONE_PROCESS)
    return losses(run)


def test_gradient_checkpointing_gives_the_same_losses(shards, eager, tmp_path):  # noqa: F811
    pretrain(shards, tmp_path / "ckpt", "run.steps=3", "engine.gradient_checkpointing=[image,text,audio]", *ONE_PROCESS)
    plain = eager
    assert len(plain) == 3 and len(plain[0]) == 8  # the total and every objective's term
    # Steps 2 and 3 follow updates made from the checkpointed gradients: equal losses mean equal gradients.
    assert losses(tmp_path / "ckpt") == plain


def test_compiled_towers_train_like_eager(shards, eager, tmp_path, monkeypatch):  # noqa: F811
    cache = tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    result = pretrain(shards, tmp_path / "compiled", "run.steps=2", "engine.compile=[image]", *ONE_PROCESS)
    assert "compiling the blocks of the image tower" in result.stderr
    assert any(files for _, _, files in os.walk(cache))  # inductor generated code: the blocks were compiled
    for reference, compiled in zip(eager[:2], losses(tmp_path / "compiled"), strict=True):
        assert reference.keys() == compiled.keys()
        for name in reference:  # inductor fuses and reorders float ops: close, not bit-identical
            assert compiled[name] == pytest.approx(reference[name], rel=1e-4, abs=1e-5), name
