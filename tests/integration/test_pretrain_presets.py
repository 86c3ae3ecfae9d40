"""The shipped pre-training presets train, through the real ``mmfuse pretrain`` (one process, a few steps)."""

import json
import subprocess
import sys

import pytest
import yaml

from tests.loaderdata import flac, write_tar

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_audio_text_preset_trains_on_laion_clap_style_shards(tmp_path):
    """LAION-CLAP's layout: 48 kHz FLAC plus a json whose "text" is the caption, no caption member, no sizes.json.
    The preset stacked with a flavor file trains audio-text contrastive and masked audio, nothing else, and the run
    records the stacked config."""
    classes = ["dog barking", "rain", "siren", "engine"]
    items = [{"__key__": f"clip{i:04d}", "flac": flac(100 * (i % 4) + i, seconds=2.5, rate=48000),
              "json": json.dumps({"text": f"a {classes[i % 4]} far away", "label": i % 4}).encode()} for i in range(32)]
    (tmp_path / "data").mkdir()
    write_tar(tmp_path / "data" / "shard-000000.tar", items)
    shard, run = tmp_path / "data" / "shard-000000.tar", tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "pretrain", "--config", "configs/pretrain/audio_text.yaml", "--config",
         "configs/model/tiny.yaml", f"data.train={shard}", f"data.eval={shard}", f"run.dir={run}", "run.steps=3",
         "data.batch_size=8", "data.workers=1", "data.shuffle_window=16", "run.log_every=1", "run.checkpoint_every=0",
         "run.save_at_end=false", "eval.batch_size=16", f"eval.classnames=[{','.join(classes)}]"],
        capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "loss" in row]
    assert [row["step"] for row in steps] == [1, 2, 3] and all(row["skipped_steps"] == 0 for row in steps)
    for row in steps:
        losses = {key for key in row if key.startswith("loss/")}
        assert losses == {"loss/contrastive/audio_text", "loss/masked_audio"}, losses
        assert all(0 < row[key] < 20 for key in losses), row
    assert not [key for row in rows for key in row if key.startswith("data_errors/")]  # every clip has both
    assert any(key.startswith("eval/zeroshot/audio/") for key in rows[-1]), rows[-1]  # through the sound templates
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded["objectives"]["contrastive"]["pairs"] == {"image_text": 0.0, "audio_text": 1.0, "image_audio": 0.0}
    assert recorded["model"]["flavor"] == "tiny" and recorded["data"]["require"] == ["audio", "text"]
    assert recorded["eval"]["templates"][0] == "this is a sound of {}."
