"""Committed checkpoints mirrored to S3 (the moto server) and resumed from there on an empty run folder."""

import re

import pytest

from tests.integration.pretraining import metrics, pretrain

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
SECRET = "sync-test-secret-5e1f"  # moto accepts any key; this one must never appear in a log or a saved file


def test_sync_uploads_commits_and_an_empty_run_folder_resumes_from_s3(shards, tmp_path, s3_server, s3fs_client, monkeypatch):  # noqa: F811
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    bucket, url = s3_server["bucket"], f"{s3_server['url']}/runs/tiny"
    steps = ("run.steps=4", "run.checkpoint_every=2", "run.keep=2", f"run.checkpoint_sync={url}")
    first = tmp_path / "first"
    logs = [pretrain(shards, first, *steps).stderr]
    remote = f"{bucket}/runs/tiny"
    for tag in ("step_000002", "step_000004"):
        local = sorted(p.name for p in (first / "checkpoints" / tag).iterdir())
        assert sorted(p.rsplit("/", 1)[-1] for p in s3fs_client.ls(f"{remote}/{tag}")) == local
        for name in local:
            assert s3fs_client.size(f"{remote}/{tag}/{name}") == (first / "checkpoints" / tag / name).stat().st_size
    assert s3fs_client.cat(f"{remote}/latest_committed") == b"step_000004"

    # The newest upload cut short before its marker: it must not be resumed from.
    s3fs_client.rm(f"{remote}/step_000004/COMMITTED")
    second = tmp_path / "second"  # another machine: nothing in its run folder
    logs.append(pretrain(shards, second, *steps).stderr)
    assert re.search(r"resumed from \S+/second/checkpoints/step_000002 at step 2", logs[-1])
    rows = metrics(second)
    assert [m["step"] for m in rows] == [3, 4]
    for a, b in zip(metrics(first)[2:], rows, strict=True):
        assert {k: v for k, v in a.items() if k.startswith(("loss", "lr"))} == {k: v for k, v in b.items() if k.startswith(("loss", "lr"))}
    assert s3fs_client.exists(f"{remote}/step_000004/COMMITTED")  # the resumed run committed and synced it again
    for text in [*logs, (first / "config.yaml").read_text(), (second / "config.yaml").read_text()]:
        assert SECRET not in text


def test_export_to_s3_then_a_run_initialised_from_it_with_a_locked_image_tower(shards, tmp_path, s3_server):  # noqa: F811
    """``mmfuse export RUN output.path=s3://...``; ``model.init_open_clip=s3://...`` through the trainer; and LiT:
    ``model.freeze=[image]`` keeps the loaded image tower exactly while the text tower trains on."""
    import torch

    from mmfuse.cli import main as cli
    from pretrain.release import load_release

    first, second, release = tmp_path / "first", tmp_path / "second", f"{s3_server['url']}/releases/first"
    pretrain(shards, first, "run.steps=2", "run.checkpoint_every=0", "model.image.stem=patch")  # open_clip's stem
    assert cli(["export", str(first), f"output.path={release}"]) == 0
    exported, config = load_release(release)
    assert config["source"]["checkpoint"] == "step_000002" and config["source"]["code_version"].startswith("0.1.0")
    pretrain(shards, second, "run.steps=2", "run.checkpoint_every=0", "model.freeze=[image]", "model.image.stem=patch",
             f"model.init_open_clip={release}/open_clip_model.safetensors")
    assert cli(["export", str(second), f"output.path={tmp_path}/second-release"]) == 0
    trained, _ = load_release(str(tmp_path / "second-release"))
    before, after = exported.clip.state_dict(), trained.clip.state_dict()
    visual = [k for k in before if k.startswith("visual.")]
    assert visual and all(torch.equal(before[k], after[k]) for k in visual)  # loaded from s3, then locked
    assert not torch.equal(before["text_projection"], after["text_projection"])  # the text tower trained on


def test_prune_keeps_the_newest_and_a_markerless_folder_is_not_a_checkpoint(s3_server, s3fs_client, tmp_path):
    from pretrain.sync import CheckpointSync

    sync = CheckpointSync(f"{s3_server['url']}/prefix")
    for step in (1, 2, 3):
        local = tmp_path / f"step_00000{step}"
        (local / "sub").mkdir(parents=True)
        (local / "sub" / "states.pt").write_bytes(bytes([step]) * 1000)
        (local / "COMMITTED").write_text("{}")
        sync.upload(local, local.name)
    s3fs_client.rm(f"{s3_server['bucket']}/prefix/step_000003/COMMITTED")
    assert sync.committed() == ["step_000001", "step_000002"]
    sync.prune(keep=1)
    assert sync.committed() == ["step_000002"] and not s3fs_client.exists(f"{s3_server['bucket']}/prefix/step_000001")
    assert sync.download_newest(tmp_path / "restored") == "step_000002"
    assert (tmp_path / "restored" / "step_000002" / "sub" / "states.pt").read_bytes() == bytes([2]) * 1000
    assert (tmp_path / "restored" / "step_000002" / "COMMITTED").is_file()
    assert CheckpointSync(f"{s3_server['url']}/nothing-here").download_newest(tmp_path / "none") is None
    # A resume from an older checkpoint sets the newer remote ones aside, whole, where nothing selects them.
    sync.upload(tmp_path / "step_000003", "step_000003")
    sync.set_aside(["step_000003"], ".abandoned-x")
    assert sync.committed() == ["step_000002"]
    assert s3fs_client.cat(f"{s3_server['bucket']}/prefix/step_000003.abandoned-x/sub/states.pt") == bytes([3]) * 1000


def test_sync_url_with_credentials_is_refused_without_echoing_them(shards, tmp_path):  # noqa: F811
    result = pretrain(shards, tmp_path / "bad", "run.checkpoint_sync=s3://AKIAXYZ:topsecret@bucket/runs", check=False)
    assert result.returncode != 0 and "run.checkpoint_sync must not carry credentials" in result.stderr
    assert "topsecret" not in result.stderr
