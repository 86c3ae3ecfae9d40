"""The sharding stage end to end on local files: bad inputs, determinism, kill-and-rerun, retry of failures."""

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_pipeline.config import ShardConfig, VerifyConfig
from data_pipeline.shard.readers import _cached_rows
from data_pipeline.shard.stage import run
from data_pipeline.shard.verify import verify
from mmfuse.config import load_config
from tests.datagen import BAD_REASONS, DIRTY_CAPTION, bad_input_zoo, good_rows, write_manifest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def shard(manifest: Path, out: Path, *overrides: str) -> dict:
    _cached_rows.cache_clear()
    cfg = load_config(ShardConfig, [], [f"input.path={manifest}", f"output.path={out}", "progress=false", "image.size=64", *overrides])
    return run(cfg)


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def samples_by_source(out: Path) -> dict[str, dict[str, bytes]]:
    """Every written sample keyed by its source, members without the key-dependent json."""
    found = {}
    for tar in sorted(out.glob("*.tar")):
        grouped: dict[str, dict[str, bytes]] = {}
        for name, data in tar_members(tar):
            key, _, ext = name.partition(".")
            grouped.setdefault(key, {})[ext] = data
        for members in grouped.values():
            meta = json.loads(members.pop("json"))
            source = meta["source"].get("image") or meta["source"].get("audio")
            found[source] = members
    return found


def dataset_files(out: Path) -> dict[str, object]:
    """The visible dataset: tar members, parquet rows, sizes (stats hold timings, so only their counts)."""
    files = {}
    for path in sorted(p for p in out.iterdir() if not p.name.startswith(".")):
        if path.suffix == ".tar":
            files[path.name] = tar_members(path)
        elif path.suffix == ".parquet":
            files[path.name] = pq.read_table(path).to_pylist()
        elif path.name.endswith("_stats.json"):
            stats = json.loads(path.read_text())
            files[path.name] = (stats["written"], stats["failed"], stats["input_rows"])
        elif path.name == "sizes.json":
            files[path.name] = path.read_text()
    return files


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    rows, good = bad_input_zoo(root)
    return write_manifest(root / "zoo.parquet", rows), write_manifest(root / "good.parquet", good), rows, good


def test_bad_inputs_counted_by_reason_and_good_samples_bit_identical(zoo, tmp_path):
    """Issue 20: no bad sample (banners, strips, a named pipe, a device, a NUL in a path, ...) stops the run."""
    zoo_manifest, good_manifest, rows, good = zoo
    assert len(rows) >= 40
    summary = shard(zoo_manifest, tmp_path / "zoo", "output.samples_per_shard=8", "processes=2")
    assert summary["failed"] == BAD_REASONS
    assert summary["written"] == len(good) == len(rows) - sum(BAD_REASONS.values())
    assert summary["input_rows"] == len(rows)
    assert summary["cleaned"] == {"text_control_chars": 1}

    clean = shard(good_manifest, tmp_path / "clean", "output.samples_per_shard=8")
    assert clean["failed"] == {} and clean["written"] == len(good)
    assert samples_by_source(tmp_path / "zoo") == samples_by_source(tmp_path / "clean")

    # Every input row is listed in the shard parquets with its status and reason.
    listed = [r for p in sorted((tmp_path / "zoo").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert len(listed) == len(rows)
    reasons = {}
    for r in listed:
        assert r["status"] == ("success" if r["error"] is None else "failed")
        if r["error"]:
            reasons[r["error"]] = reasons.get(r["error"], 0) + 1
    assert reasons == BAD_REASONS
    # Each shard's stats count exactly the failed rows of its parquet.
    for stats_path in sorted((tmp_path / "zoo").glob("*_stats.json")):
        stats = json.loads(stats_path.read_text())
        shard_rows = pq.read_table(stats_path.with_name(stats["shard"] + ".parquet")).to_pylist()
        failed = {}
        for r in shard_rows:
            if r["error"]:
                failed[r["error"]] = failed.get(r["error"], 0) + 1
        assert stats["failed"] == failed and stats["written"] == len(shard_rows) - sum(failed.values())
    dirty = next(r for r in listed if (r["image"] or "").endswith("dirty.jpg"))
    assert (dirty["status"], dirty["detail"]) == ("success", "6 control characters stripped")
    assert samples_by_source(tmp_path / "zoo")[dirty["image"]]["txt"] == b"a [1mred[0m kite"
    assert verify(VerifyConfig(path=str(tmp_path / "zoo"))).ok
    # Retrying the failures finds the same reasons and keeps counting the cleaned caption.
    retried = shard(zoo_manifest, tmp_path / "zoo", "output.samples_per_shard=8", "processes=2", "retry_failed=true")
    assert retried["failed"] == BAD_REASONS and retried["written"] == len(good)
    assert retried["cleaned"] == {"text_control_chars": 1}


def test_tricky_images_decoded_correctly(zoo, tmp_path):
    zoo_manifest, *_ = zoo
    shard(zoo_manifest, tmp_path / "out", "output.samples_per_shard=100")
    metas = {}
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        for m in tar.getmembers():
            if m.name.endswith(".json"):
                meta = json.loads(tar.extractfile(m).read())
                metas[meta["source"].get("image", "").rsplit("/", 1)[-1]] = meta
    rotated = metas["rotated.jpg"]  # 240x120 stored with orientation 6: portrait after transpose
    assert (rotated["original_width"], rotated["original_height"]) == (120, 240)
    assert rotated["width"] == 64 and rotated["height"] == 128
    assert (metas["cmyk.jpg"]["width"], metas["deep16.png"]["height"]) == (85, 64)
    # Odd but valid images are converted, not lost (palette + transparency, animated GIF, 1-bit, 16-bit TIFF, ...).
    odd = {"palette_alpha.png": (96, 64), "animated.gif": (85, 64), "rgba.png": (85, 64), "bilevel.png": (85, 64),
           "wide19.jpg": (1216, 64), "photo.webp": (80, 64), "progressive.jpg": (96, 64), "grey16.tif": (96, 64)}
    assert {name: (metas[name]["width"], metas[name]["height"]) for name in odd} == odd


def test_one_and_two_processes_write_identical_shards(tmp_path):
    rows = good_rows(tmp_path, 18)
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    shard(manifest, tmp_path / "p1", "processes=1", "output.samples_per_shard=4")
    shard(manifest, tmp_path / "p2", "processes=2", "output.samples_per_shard=4", "fetch.threads=3")
    one, two = dataset_files(tmp_path / "p1"), dataset_files(tmp_path / "p2")
    assert len([n for n in one if n.endswith(".tar")]) == 5
    assert one == two


def test_rerun_with_other_settings_is_refused(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", good_rows(tmp_path, 3))
    shard(manifest, tmp_path / "out")
    before = dataset_files(tmp_path / "out")
    with pytest.raises(ValueError, match="other settings"):
        shard(manifest, tmp_path / "out", "image.quality=50")
    assert dataset_files(tmp_path / "out") == before  # nothing already written is lost


def test_sigkill_then_rerun_equals_clean_run(tmp_path):
    rows = good_rows(tmp_path, 4, audio_every=100) * 1
    rows = [dict(r, text=f"row {i}".encode()) for i, r in enumerate(rows * 30)]  # 120 rows, 60 shards
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    args = [f"input.path={manifest}", "progress=false", "image.size=64", "output.samples_per_shard=2", "processes=2", "dedup=false"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "data_pipeline", "shard", *args, f"output.path={killed}"],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(killed.glob("*_stats.json"))) < 5:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list(killed.glob("*_stats.json")))
    assert 5 <= done_at_kill < 60, "the run must be interrupted part-way"
    assert not (killed / "dataset.json").exists()

    summary = shard(manifest, killed, *args[1:])
    clean = shard(manifest, tmp_path / "clean", *args[1:])
    assert summary["written"] == clean["written"] == 120
    assert dataset_files(killed) == dataset_files(tmp_path / "clean")
    assert not [p for p in killed.iterdir() if ".tmp-" in p.name]
    assert verify(VerifyConfig(path=str(killed))).ok


def test_rerun_skips_finished_shards(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", good_rows(tmp_path, 6))
    shard(manifest, tmp_path / "out", "output.samples_per_shard=2")
    tar = tmp_path / "out" / "shard-000001.tar"
    stamp = tar.stat().st_mtime_ns
    (tmp_path / "out" / "shard-000002_stats.json").unlink()
    shard(manifest, tmp_path / "out", "output.samples_per_shard=2")
    assert tar.stat().st_mtime_ns == stamp  # not rewritten
    assert (tmp_path / "out" / "shard-000002_stats.json").exists()


def test_retry_failed_redoes_only_failures(tmp_path):
    rows = good_rows(tmp_path, 4)
    rows[2] = dict(rows[2], image="files/late.jpg")  # not there yet: fails with file_not_found
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    first = shard(manifest, tmp_path / "out", "output.samples_per_shard=4")
    assert first["failed"] == {"file_not_found": 1}
    (tmp_path / "files" / "late.jpg").write_bytes((tmp_path / rows[1]["image"]).read_bytes())
    untouched = shard(manifest, tmp_path / "out", "output.samples_per_shard=4")
    assert untouched["failed"] == {"file_not_found": 1}  # a plain rerun skips finished shards
    retried = shard(manifest, tmp_path / "out", "output.samples_per_shard=4", "retry_failed=true")
    assert retried["failed"] == {} and retried["written"] == 4
    clean = shard(manifest, tmp_path / "clean", "output.samples_per_shard=4")
    assert dataset_files(tmp_path / "out") == dataset_files(tmp_path / "clean")


def test_verify_reports_truncated_and_missing_shards(tmp_path, capsys):
    manifest = write_manifest(tmp_path / "m.parquet", good_rows(tmp_path, 6))
    out = tmp_path / "out"
    shard(manifest, out, "output.samples_per_shard=2")
    from data_pipeline.shard.verify import main as verify_main
    assert verify_main([str(out)]) == 0
    data = (out / "shard-000000.tar").read_bytes()
    (out / "shard-000000.tar").write_bytes(data[: len(data) // 2])
    (out / "shard-000002.tar").unlink()
    assert verify_main([str(out)]) == 1
    err = capsys.readouterr().err
    assert "shard-000000.tar: truncated" in err and "shard-000002.tar: missing" in err


def test_shard_parquets_read_together_as_one_table(zoo, tmp_path):
    zoo_manifest, _, rows, _ = zoo
    shard(zoo_manifest, tmp_path / "out", "output.samples_per_shard=4")
    table = pq.read_table(sorted(str(p) for p in (tmp_path / "out").glob("*.parquet")))
    assert table.num_rows == len(rows)
    assert table.schema.field("width").type == "int64" and table.schema.field("error").type == "string"


@pytest.mark.parametrize("guard, reason", [("20", "bad_aspect_ratio"), ("0", "image_too_large")])
def test_a_468x1_png_fails_alone_and_the_shard_is_written(tmp_path, guard, reason):
    """Issue 20 as reported: the banner aborted its shard (OSError from the JPEG encoder) and every rerun with it."""
    rows = good_rows(tmp_path, 3)
    good = [r["image"] for r in rows]
    for name, size in (("banner", (468, 1)), ("tower", (1, 468)), ("strip", (20000, 1))):
        Image.new("RGB", size, (200, 30, 30)).save(tmp_path / "files" / f"{name}.png")
        rows.insert(1, {"image": f"files/{name}.png", "text": name.encode(), "audio": None})
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    summary = shard(manifest, tmp_path / "out", "image.size=256", f"image.max_aspect_ratio={guard}", "image.min_side=1")
    assert summary["failed"] == {reason: 3} and summary["written"] == 3
    assert sorted(samples_by_source(tmp_path / "out")) == sorted(str(tmp_path / image) for image in good)
