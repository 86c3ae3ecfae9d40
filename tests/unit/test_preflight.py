"""The checks every stage runs before any process starts (data_pipeline/preflight.py) and the objectives' modality
requirements: fast, no torch."""

from __future__ import annotations

import io
import json
import sys
import tarfile

import pytest

from data_pipeline.config import MembersConfig
from data_pipeline.preflight import PreflightError, check_credentials, check_dataset, check_output, dataset_modalities
from pretrain.objectives.config import ObjectivesConfig, missing_modalities, read_modalities


def write_tar(path, samples: dict[str, dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def dataset(root, modalities: list[str] | None = None, samples: int = 2) -> str:
    """A folder dataset: two shards of jpg + flac samples (headers only matter), sizes.json, maybe dataset.json."""
    root.mkdir()
    for shard in range(2):
        write_tar(root / f"shard-{shard:06d}.tar", {f"{shard:06d}{i:04d}": {"jpg": b"x", "flac": b"y"} for i in range(samples)})
    (root / "sizes.json").write_text(json.dumps({f"shard-{s:06d}.tar": samples for s in range(2)}))
    if modalities is not None:
        (root / "dataset.json").write_text(json.dumps({"modalities": modalities}))
    return str(root)


def test_a_dataset_is_listed_without_reading_its_tars(tmp_path):
    root = dataset(tmp_path / "ds")
    listing = check_dataset("data.train", f"{root}::{root}/shard-{{000000..000001}}.tar")
    assert [count for _, count in listing] == [2, 2, 2, 2]


@pytest.mark.parametrize("spec, message", [
    ("{tmp}/nowhere", "data.train: '{tmp}/nowhere' does not exist"),
    ("{tmp}/ds/shard-{{000000..000003}}.tar", "data.train: 2 of the 4 shard(s) checked do not exist, e.g. '{tmp}/ds/shard-000002.tar'"),
    ("{tmp}/ds::{tmp}/plain", "data.train: '{tmp}/plain' is neither a .tar, a brace pattern, nor a folder of shards (sizes.json, or .tar files as img2dataset writes them)"),
    ("{tmp}/empty", "data.train: '{tmp}/empty' holds no samples"),
    ("", "data.train is empty"),
])
def test_a_dataset_that_cannot_be_read_is_one_line_naming_the_key_and_path(tmp_path, spec, message):
    dataset(tmp_path / "ds")
    (tmp_path / "plain").mkdir()
    dataset(tmp_path / "empty", samples=0)
    with pytest.raises(PreflightError) as err:
        check_dataset("data.train", spec.format(tmp=tmp_path))
    assert message.format(tmp=tmp_path) in str(err.value) and "\n" not in str(err.value)


def test_an_output_under_a_file_is_refused_and_a_new_one_is_not_created(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(PreflightError, match="run.dir: .* is a file, not a folder"):
        check_output("run.dir", str(tmp_path / "file" / "run"))
    check_output("run.dir", str(tmp_path / "new" / "run"))
    assert not (tmp_path / "new").exists()


def test_modalities_come_from_dataset_json_or_a_peek_at_the_first_shard(tmp_path):
    members = MembersConfig()
    assert dataset_modalities(dataset(tmp_path / "summary", ["image", "text"]), members) == {"image", "text"}
    assert dataset_modalities(dataset(tmp_path / "peeked"), members) == {"image", "audio"}
    write_tar(tmp_path / "clap.tar", {"a": {"flac": b"y", "json": json.dumps({"text": "a dog barks"}).encode()}})
    assert dataset_modalities(str(tmp_path / "clap.tar"), members) == {"audio", "text"}  # LAION-CLAP's caption field


def test_objectives_the_data_cannot_feed_are_named_with_what_they_lack():
    every = ObjectivesConfig()
    for name in ("masked_image", "masked_audio", "masked_text", "cross_modal_masked"):
        getattr(every, name).weight = 0.5
    assert missing_modalities(every, {"image", "text", "audio"}) == {}
    assert missing_modalities(every, {"image", "audio"}) == {"masked_text": "text", "cross_modal_masked": "text and image or audio"}
    every.contrastive.pairs["image_audio"] = 0.0
    assert "contrastive" in missing_modalities(every, {"image", "audio"})
    assert missing_modalities(ObjectivesConfig(), {"text"}) == {"contrastive": "a pair with both modalities (image_text, "
                                                                               "audio_text, image_audio)"}


def test_the_training_loader_decodes_only_what_an_enabled_objective_reads():
    image_text = ObjectivesConfig()
    image_text.contrastive.pairs.update(audio_text=0.0, image_audio=0.0)
    assert read_modalities(image_text) == {"image", "text"}
    image_text.masked_audio.weight = 0.5
    assert read_modalities(image_text) == {"image", "text", "audio"}
    text_only = ObjectivesConfig()
    text_only.contrastive.weight = 0.0
    text_only.masked_text.weight = 1.0
    assert read_modalities(text_only) == {"text"}


def test_s3_without_credentials_is_one_line_naming_the_url_without_secrets(monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(PreflightError) as err:
        check_credentials("data.train", "s3://bucket/shapes?X-Amz-Signature=secret")
    assert str(err.value).startswith("data.train: s3://bucket/shapes?<redacted> needs AWS credentials")
    assert "secret" not in str(err.value)


def test_s3_outputs_are_probed_with_a_write(s3_server):
    check_output("run.checkpoint_sync", f"{s3_server['url']}/runs/a")
    with pytest.raises(PreflightError, match="run.checkpoint_sync: cannot write to s3://no-such-bucket-x/runs"):
        check_output("run.checkpoint_sync", "s3://no-such-bucket-x/runs")


def test_the_checks_import_no_torch():
    import subprocess

    code = ("import sys; import pretrain.run, finetune.run, data_pipeline.shard.stage, data_pipeline.preflight, "
            "finetune.records, finetune.checkpoint, pretrain.release; print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_a_manifest_given_as_training_data_answers_with_the_shard_command(tmp_path):
    manifest = tmp_path / "raw" / "manifest.parquet"
    manifest.parent.mkdir()
    manifest.write_bytes(b"PAR1")
    shards = tmp_path / "raw" / "shards"
    with pytest.raises(PreflightError, match=f"shard it first with `mmfuse shard input.path={manifest} "
                                             f"output.path={shards}`, then set data.train={shards}"):
        check_dataset("data.train", str(manifest))


def test_shards_written_far_from_the_models_input_size_get_one_line_each(tmp_path):
    import json

    from data_pipeline.preflight import size_mismatch

    def dataset(name, **image):
        (tmp_path / name).mkdir()
        (tmp_path / name / "dataset.json").write_text(json.dumps({"config": {"image": image}}))
        return str(tmp_path / name)

    big, right, small = dataset("big", size=256), dataset("right", size=128), dataset("small", size=28)
    unknown = dataset("unknown", size=256, resize_mode="no")
    (tmp_path / "img2dataset").mkdir()
    lines = size_mismatch("data.train", "::".join([big, right, small, unknown, str(tmp_path / "img2dataset")]), 64)
    assert len(lines) == 2
    assert "big holds images at 256 px and the model reads 64 px" in lines[0] and "about 16x" in lines[0]
    assert "image.size=64" in lines[0]
    assert "small holds images at 28 px" in lines[1] and "upsampled 2.3x" in lines[1]
