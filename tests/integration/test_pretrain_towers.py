"""Per-tower switches through the real trainer (1 process, DeepSpeed ZeRO-2 over gloo, fp32, tiny flavor)."""

import os

import pytest

from tests.integration.pretraining import metrics, pretrain

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
ONE_PROCESS = ("launch.nproc=1", "run.checkpoint_every=0")


def losses(run_dir):
    return [{k: v for k, v in row.items() if k.startswith("loss")} for row in metrics(run_dir)]


def test_gradient_checkpointing_gives_the_same_losses(shards, tmp_path):  # noqa: F811
    pretrain(shards, tmp_path / "plain", "run.steps=3", *ONE_PROCESS)
    pretrain(shards, tmp_path / "ckpt", "run.steps=3", "engine.gradient_checkpointing=[image,text,audio]", *ONE_PROCESS)
    plain = losses(tmp_path / "plain")
    assert len(plain) == 3 and len(plain[0]) == 8  # the total and every objective's term
    # Steps 2 and 3 follow updates made from the checkpointed gradients: equal losses mean equal gradients.
    assert losses(tmp_path / "ckpt") == plain


def test_compiled_towers_train_like_eager(shards, tmp_path, monkeypatch):  # noqa: F811
    cache = tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    pretrain(shards, tmp_path / "eager", "run.steps=2", *ONE_PROCESS)
    result = pretrain(shards, tmp_path / "compiled", "run.steps=2", "engine.compile=[image]", *ONE_PROCESS)
    assert "compiling the blocks of the image tower" in result.stderr
    assert any(files for _, _, files in os.walk(cache))  # inductor generated code: the blocks were compiled
    for eager, compiled in zip(losses(tmp_path / "eager"), losses(tmp_path / "compiled"), strict=True):
        assert eager.keys() == compiled.keys()
        for name in eager:  # inductor fuses and reorders float ops: close, not bit-identical
            assert compiled[name] == pytest.approx(eager[name], rel=1e-4, abs=1e-5), name
