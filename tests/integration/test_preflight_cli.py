"""Through the real CLI in a subprocess: a bad input or output of any stage is one clear line and a non-zero exit,
in seconds, before any rank, worker or job starts and before anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.unit.test_preflight import dataset, write_tar

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
FAST = 10.0  # seconds; about 0.3-1 s here, against 11-36 s when the ranks found the problem


def mmfuse(*args, env=None):
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "mmfuse.cli", *args], capture_output=True, text=True, timeout=60,
                            env=env)
    return result, time.monotonic() - started


def assert_one_line_error(result, seconds, message):
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr[-2000:]
    assert message in lines[0] and "[rank" not in result.stderr
    assert seconds < FAST


@pytest.fixture
def release(tmp_path):
    """A release folder that passes the checkpoint checks (no weights are read before the data checks)."""
    from pretrain.config import PretrainConfig
    from pretrain.release import release_config
    from mmfuse.config import load_config

    cfg = load_config(PretrainConfig, [], ["model.flavor=tiny", "data.train=x", "run.dir=x"], {"model.flavor": "model/{}.yaml"})
    root = tmp_path / "release"
    root.mkdir()
    (root / "config.json").write_text(json.dumps(release_config(cfg.model, {})))
    (root / "model.safetensors").write_bytes(b"")
    return root


PRETRAIN = ["pretrain", "--config", "configs/pretrain/tiny.yaml", "run.steps=2"]


def test_pretrain_inputs_and_outputs_fail_before_any_rank(tmp_path):
    data = dataset(tmp_path / "ds", ["image", "text", "audio"])
    run = tmp_path / "run"
    (tmp_path / "file").write_text("")
    cases = [
        ([f"data.train={tmp_path}/nowhere"], f"data.train: '{tmp_path}/nowhere' does not exist"),
        ([f"data.train={data}", f"data.eval={tmp_path}/held-out"], f"data.eval: '{tmp_path}/held-out' does not exist"),
        ([f"data.train={data}/shard-{{000000..000002}}.tar"], "data.train: 1 of the 3 shard(s) checked do not exist"),
        ([f"data.train={data}", f"run.dir={tmp_path}/file/run"], "run.dir: "),
        ([f"data.train={data}", f"model.init_open_clip={tmp_path}/ViT.safetensors"], "model.init_open_clip: "),
    ]
    for overrides, message in cases:
        result, seconds = mmfuse(*PRETRAIN, f"run.dir={run}", *overrides)
        assert_one_line_error(result, seconds, message)
    assert not run.exists()


def test_pretrain_on_data_without_captions_names_the_objectives_that_need_them(tmp_path):
    data = dataset(tmp_path / "ds")  # jpg + flac only, no dataset.json: the first shard is peeked at
    result, seconds = mmfuse(*PRETRAIN, f"data.train={data}", f"run.dir={tmp_path}/run")
    assert_one_line_error(result, seconds, "data.train has audio, image only: objectives.masked_text needs text; "
                                           "objectives.cross_modal_masked needs text and image or audio")


def test_pretrain_on_s3_without_credentials_names_the_url_and_no_secret(tmp_path, s3_server):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") or k in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true")
    url = f"{s3_server['url']}/shapes"
    result, seconds = mmfuse(*PRETRAIN, f"data.train={url}", f"run.dir={tmp_path}/run", env=env)
    assert_one_line_error(result, seconds, f"data.train: {url} needs AWS credentials")
    # With credentials, a prefix that holds nothing is found as quickly; the secret never shows.
    result, seconds = mmfuse(*PRETRAIN, f"data.train={url}", f"run.dir={tmp_path}/run")
    assert_one_line_error(result, seconds, f"data.train: '{url}' does not exist")
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in result.stderr


def test_finetune_and_eval_check_checkpoint_data_and_the_files_it_names(tmp_path, release):
    (tmp_path / "q.json").write_text(json.dumps({"questions": [{"question_id": 1, "image_id": 3, "question": "?"}]}))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": [{"question_id": 1, "answers": [{"answer": "a"}]}]}))
    vqa = ["--config", "configs/finetune/vqa.yaml", f"run.dir={tmp_path}/run", f"data.eval={tmp_path}/q.json",
           f"data.eval_annotations={tmp_path}/a.json"]
    cases = [
        (["eval", *vqa, f"checkpoint={tmp_path}/missing"], f"checkpoint: '{tmp_path}/missing' does not exist"),
        (["eval", *vqa, f"checkpoint={release}"], "data.eval: VQA questions"),
        (["eval", *vqa, f"checkpoint={release}", "data.image_template='{image_id}.png'"],
         f"data.eval: none of the 1 media files checked exists, e.g. '{tmp_path}/3.png'"),
        (["finetune", *vqa, f"checkpoint={release}", f"data.train={tmp_path}/train.json"],
         f"data.train: data '{tmp_path}/train.json' does not exist"),
    ]
    for args, message in cases:
        result, seconds = mmfuse(*args)
        assert_one_line_error(result, seconds, message)
    assert not (tmp_path / "run").exists()


def test_shard_and_submit_check_their_outputs_and_inputs_before_any_job(tmp_path):
    (tmp_path / "file").write_text("")
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "a.jpg", "text": "a"}) + "\n")
    result, seconds = mmfuse("shard", f"input.path={tmp_path}/m.jsonl", f"output.path={tmp_path}/file/out")
    assert_one_line_error(result, seconds, "output.path: ")
    result, seconds = mmfuse("submit", *PRETRAIN, "--slurm", "configs/slurm/local-executor.yaml",
                             f"data.train={tmp_path}/nowhere", f"run.dir={tmp_path}/run")
    assert_one_line_error(result, seconds, f"data.train: '{tmp_path}/nowhere' does not exist")
    assert not (tmp_path / "run").exists()  # no slurm folder, no job


def test_shard_with_no_sample_written_fails_naming_the_reasons_and_inputs(tmp_path):
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"image": f"{tmp_path}/missing-{i}.jpg", "text": "a"}) + "\n"
                                              for i in range(3)))
    result, _ = mmfuse("shard", f"input.path={tmp_path}/m.jsonl", f"output.path={tmp_path}/out", "processes=1",
                       "progress=false")
    assert result.returncode == 1
    assert f"mmfuse shard: error: no sample was written: all 3 input rows failed (" in result.stderr
    assert f"the first inputs: '{tmp_path}/missing-0.jpg'" in result.stderr
