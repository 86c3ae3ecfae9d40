"""mmfuse curate on shards of the synthetic world with planted copies and bad captions, and the loader reading the
kept samples from the original shards (data.keep)."""

import io
import json
import os
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_pipeline.config import LoaderConfig
from data_pipeline.loader import build_loader
from data_pipeline.loader.tarstream import iter_samples
from mmfuse.cli import main as cli
from mmfuse.config import load_config
from tests.loaderdata import write_tar

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def reencoded(jpg: bytes, size: int, quality: int) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(jpg)).convert("RGB").resize((size, size), Image.BICUBIC).save(out, "JPEG", quality=quality)
    return out.getvalue()


@pytest.fixture(scope="module")
def noisy(shards, tmp_path_factory):
    """The 96 synthetic samples, then per shard: 2 byte-identical copies, 2 re-encoded and resized copies, one empty
    caption and one spam caption (new keys, other samples' pictures). Returns (dataset, {key: (reason, original)})."""
    root = tmp_path_factory.mktemp("noisy")
    planted, sizes = {}, {}
    for s, tar in enumerate(sorted(Path(shards).glob("*.tar"))):
        items = [{"__key__": raw.key, **raw.members} for raw in iter_samples(str(tar), {"jpg", "txt", "json", "flac"}, 1 << 30)]
        extra = []
        for k, (item, kind) in enumerate(zip(items, ["duplicate", "duplicate", "near_duplicate", "near_duplicate"])):
            jpg = item["jpg"] if kind == "duplicate" else reencoded(item["jpg"], 48 + 8 * k, 70)
            extra.append({**item, "__key__": f"copy{s}{k}", "jpg": jpg})
            planted[f"copy{s}{k}"] = (kind, item["__key__"])
        for k, (text, reason) in enumerate([(b"", "caption_short"), (b"buy buy buy buy now", "caption_repetitive")]):
            # Another sample's picture too: the caption rule, which runs first, is the reason given.
            extra.append({**items[10 + k], "__key__": f"text{s}{k}", "txt": text})
            planted[f"text{s}{k}"] = (reason, "")
        rows = items[:12] + extra + items[12:]  # copies after their originals, in the middle of the shard
        write_tar(root / tar.name, rows)
        sizes[tar.name] = len(rows)
    (root / "sizes.json").write_text(json.dumps(sizes))
    return root, planted


def curate(dataset, out, *overrides):
    return cli(["curate", f"input.path={dataset}", f"output.path={out}", "progress=false", "captions.max_repeat=0.5",
                *overrides])


def test_planted_copies_and_bad_captions_are_dropped_and_every_original_kept(noisy, tmp_path, capsys):
    dataset, planted = noisy
    assert curate(dataset, tmp_path / "out") == 0
    index = pq.read_table(tmp_path / "out" / "index.parquet").to_pylist()
    assert len(index) == 96 + 4 * 6
    by_key = {row["key"]: row for row in index}
    for key, (reason, original) in planted.items():
        assert (by_key[key]["reason"], by_key[key]["duplicate_of"]) == (reason, original), key
    originals = [row for row in index if row["key"] not in planted]
    assert all(row["kept"] and row["reason"] == "" for row in originals)  # no false removal
    assert [(row["shard"], row["position"]) for row in index] == sorted((row["shard"], row["position"]) for row in index)
    summary = json.loads((tmp_path / "out" / "curate.json").read_text())
    assert summary["kept"] == 96 and summary["dropped"] == dict(Counter(reason for reason, _ in planted.values()))
    assert "curate: kept 96 of 120 samples (80.0%); dropped" in capsys.readouterr().err
    report = (tmp_path / "out" / "REPORT.md").read_text()
    assert "| duplicate | 8 | 6.7% | copy00 (of " in report and "data.keep=" in report


def test_a_changed_rule_is_decided_again_from_the_scans_without_reading_a_shard(noisy, tmp_path):
    dataset, planted = noisy
    out = tmp_path / "out"
    assert curate(dataset, out) == 0
    scans = {p: p.stat().st_mtime_ns for p in (out / "scan").glob("*.parquet")}
    assert len(scans) == 4
    assert curate(dataset, out, "dedup.near=false", "captions.min_words=0") == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "scan").glob("*.parquet")} == scans
    reasons = Counter(row["reason"] for row in pq.read_table(out / "index.parquet").to_pylist())
    # The empty captions pass now, and their pictures are other samples' (the fixture): copies, one reason each.
    assert reasons == {"": 96 + 8, "duplicate": 8 + 4, "caption_repetitive": 4}
    # Scans made reading other members are not reused silently.
    assert curate(dataset, out, "members.text=caption") == 1


def test_scans_without_near_duplicate_removal_skip_the_hashes_until_a_rerun_needs_them(noisy, tmp_path):
    dataset, planted = noisy
    out = tmp_path / "out"
    assert curate(dataset, out, "dedup.near=false") == 0
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert {row["phash"] for row in index} == {""} and all(row["width"] > 0 for row in index)
    assert {pq.read_schema(p).metadata[b"mmfuse.phash"] for p in (out / "scan").glob("*.parquet")} == {b"false"}
    scans = {p: p.stat().st_mtime_ns for p in (out / "scan").glob("*.parquet")}
    assert curate(dataset, out) == 0  # near-duplicate removal on: every shard is scanned again, with its hashes
    assert all(p.stat().st_mtime_ns != mtime for p, mtime in scans.items())
    by_key = {row["key"]: row for row in pq.read_table(out / "index.parquet").to_pylist()}
    for key, (reason, original) in planted.items():
        assert (by_key[key]["reason"], by_key[key]["duplicate_of"]) == (reason, original), key
    assert all(len(row["phash"]) == 16 for row in by_key.values())


def test_the_loader_reads_exactly_the_kept_samples_from_the_original_shards(noisy, tmp_path):
    dataset, planted = noisy
    assert curate(dataset, tmp_path / "out") == 0
    kept = {row["key"] for row in pq.read_table(tmp_path / "out" / "index.parquet").to_pylist() if row["kept"]}
    cfg = load_config(LoaderConfig, [], [f"train={dataset}", f"keep={tmp_path}/out", "batch_size=8", "workers=2",
                                         "shuffle_window=16"])
    loaders = [build_loader(cfg, rank, 2) for rank in range(2)]
    batches = [[batch["__key__"] for batch in loader] for loader in loaders]
    keys = [key for rank in batches for batch in rank for key in batch]
    assert Counter(keys) == Counter(kept)  # each kept sample once, nothing else
    assert len(batches[0]) == len(batches[1]) == len(loaders[0]) == 96 // (2 * 8)
    # Resume mid-epoch: a new loader at batch 3 of rank 1 goes on with the same samples.
    resumed = build_loader(cfg, 1, 2)
    resumed.load_state_dict({**loaders[1].state_dict(), "epoch": 0, "step": 3})
    assert [batch["__key__"] for batch in resumed] == batches[1][3:]


def test_the_kept_samples_written_as_shards_of_their_own(noisy, tmp_path, capsys):
    dataset, planted = noisy
    out, copy = tmp_path / "out", tmp_path / "kept"
    assert curate(dataset, out, f"output.shards={copy}") == 0
    index = pq.read_table(out / "index.parquet").to_pylist()
    kept = [row for row in index if row["kept"]]
    assert "wrote the 96 kept samples as 4 shards" in capsys.readouterr().err
    assert cli(["verify", str(copy)]) == 0  # a finished dataset: sizes.json, dataset.json, stats agree with the tars
    originals = {raw.key: raw.members for tar in sorted(Path(dataset).glob("*.tar"))
                 for raw in iter_samples(str(tar), None, 1 << 30)}
    copied = [raw for tar in sorted(copy.glob("*.tar")) for raw in iter_samples(str(tar), None, 1 << 30)]
    assert [raw.key for raw in copied] == [row["key"] for row in kept]  # in dataset order, nothing else
    assert all(raw.members == originals[raw.key] for raw in copied)  # every member, byte for byte
    assert json.loads((copy / "dataset.json").read_text())["written"] == 96
    # A stricter rerun rewrites the folder from the new index: a shard left with no kept sample goes.
    assert curate(dataset, out, f"output.shards={copy}", "balance.concepts=[red circle]", "balance.max_per_concept=1",
                  "balance.unmatched=drop") == 0
    left = {row["shard"] for row in pq.read_table(out / "index.parquet").to_pylist() if row["kept"]}
    assert sorted(p.name for p in copy.glob("*.tar")) == sorted(left) and len(left) == 1
    assert cli(["verify", str(copy)]) == 0
    # Not into the folder it reads.
    assert curate(dataset, tmp_path / "again", f"output.shards={dataset}") == 1
    assert "output.shards must be a folder of its own" in capsys.readouterr().err


def test_pre_training_on_the_kept_samples_evaluates_on_the_whole_held_out_set(noisy, shards, tmp_path):
    from tests.integration.pretraining import metrics, pretrain

    dataset, _ = noisy
    assert curate(dataset, tmp_path / "out") == 0
    # The eval shards share the pool's shard names but hold fewer samples: the subset index is the pool's only.
    pretrain(dataset, tmp_path / "run", f"data.keep={tmp_path}/out", f"data.eval={shards}", "launch.nproc=1",
             "run.steps=2", "run.eval_every=2", "run.eval_untrained=false", "eval.batch_size=32")
    (evaluated,) = [row for row in metrics(tmp_path / "run") if "eval/samples" in row]
    assert evaluated["eval/samples"] == 96  # every held-out sample, none dropped by the training's subset


def test_bad_input_stops_before_any_shard_is_read(noisy, shards, tmp_path, capsys):
    dataset, _ = noisy
    # Every sample dropped: an error, with the decisions written to look at.
    assert curate(dataset, tmp_path / "all", "captions.min_words=50") == 1
    assert "every one of the 120 samples was dropped (caption_short 120)" in capsys.readouterr().err
    assert (tmp_path / "all" / "index.parquet").is_file()
    # A subset index of another dataset, or none at all, fails the training's launcher in seconds.
    assert curate(dataset, tmp_path / "ok") == 0
    other = tmp_path / "other"
    other.mkdir()
    for tar in Path(shards).glob("*.tar"):
        os.symlink(tar, other / tar.name.replace("shard-", "part-"))
    (other / "sizes.json").write_text(json.dumps({t.name.replace("shard-", "part-"): 24 for t in Path(shards).glob("*.tar")}))
    common = ["pretrain", "--config", "configs/pretrain/tiny.yaml", f"run.dir={tmp_path}/run"]
    assert cli([*common, f"data.train={other}", f"data.keep={tmp_path}/ok"]) == 1
    assert "names shards that" in capsys.readouterr().err
    assert cli([*common, f"data.train={dataset}", f"data.keep={tmp_path}/nowhere"]) == 1
    assert "no subset index there" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    # Caption rules on a dataset without captions: said before scanning.
    bare = tmp_path / "bare"
    bare.mkdir()
    write_tar(bare / "shard-000000.tar", [{"__key__": f"k{i}", "jpg": (Path(dataset) / "sizes.json").read_bytes()} for i in range(3)])
    (bare / "sizes.json").write_text(json.dumps({"shard-000000.tar": 3}))
    assert curate(bare, tmp_path / "bare-out") == 1
    assert "no captions: the caption rules would drop every sample" in capsys.readouterr().err
    assert not (tmp_path / "bare-out" / "scan").exists()


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    """A release of the tiny flavor at random initialisation: scores that mean nothing, computed the real way."""
    import torch

    from mmfuse.config import CONFIG_ROOT
    from pretrain.model import ModelConfig, MultimodalModel
    from pretrain.release import save_release

    torch.manual_seed(0)
    model_cfg = load_config(ModelConfig, [str(CONFIG_ROOT / "model" / "tiny.yaml")], ["image.image_size=64"])
    root = tmp_path_factory.mktemp("scorer") / "release"
    save_release(MultimodalModel(model_cfg).state_dict(), model_cfg, str(root), {"test": "random init"})
    return root


def test_a_release_scores_every_pair_and_the_top_fraction_is_kept(noisy, scorer, tmp_path):
    import numpy as np
    import open_clip
    import torch

    from pretrain.release import load_release

    dataset, planted = noisy
    out = tmp_path / "out"
    assert curate(dataset, out, f"scorer={scorer}", "similarity.top_fraction=0.5", "dedup.near=false",
                  "scorer_batch_size=16") == 0
    scan = pq.read_table(out / "scan" / "shard-000000.parquet")
    assert {"image_embedding", "text_embedding", "audio_embedding", "image_text_similarity"} <= set(scan.column_names)
    index = pq.read_table(out / "index.parquet").to_pylist()
    # The similarity rule runs after the caption rules and before de-duplication.
    judged = [row for row in index if row["reason"] in ("", "low_similarity", "duplicate")]
    passed = [row for row in judged if row["reason"] != "low_similarity"]
    # Every sample has an image; all but the planted empty captions have a caption to score it against.
    assert [row["key"] for row in index if not np.isfinite(row["image_text_similarity"])] == [
        key for key, (reason, _) in planted.items() if reason == "caption_short"]
    assert len(passed) == -(-len(judged) // 2)  # the better half of those still kept
    worst_passed = min(row["image_text_similarity"] for row in passed)
    assert all(row["image_text_similarity"] <= worst_passed for row in judged if row["reason"] == "low_similarity")
    assert sum(np.isnan(row["audio_text_similarity"]) for row in index) > 0  # a third of the samples have no audio
    # The score is the cosine the release itself gives the pair.
    model, _ = load_release(str(scorer))
    model.eval()
    (raw,) = [r for r in iter_samples(str(Path(dataset) / "shard-000000.tar"), {"jpg", "txt"}, 1 << 30) if r.key == index[0]["key"]]
    transform = open_clip.image_transform(64, is_train=False)
    tokens = open_clip.tokenizer.SimpleTokenizer(context_length=model.cfg.text.context_length)([raw.members["txt"].decode()])
    with torch.no_grad():
        image = model.embed("image", transform(Image.open(io.BytesIO(raw.members["jpg"])).convert("RGB"))[None])
        expected = float((image * model.embed("text", tokens)).sum())
    assert index[0]["image_text_similarity"] == pytest.approx(expected, abs=1e-4)
    assert (out / "similarity.png").read_bytes().startswith(b"\x89PNG") and "similarity.png" in (out / "REPORT.md").read_text()


def test_a_wrong_scorer_is_one_line_before_any_shard_is_read_and_binds_nothing(noisy, tmp_path, capsys):
    dataset, _ = noisy
    out = tmp_path / "out"
    assert curate(dataset, out, f"scorer={tmp_path}/nosuch") == 1
    assert "is not a release folder (no config.json)" in capsys.readouterr().err and not (out / "scan").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model": {}}')
    assert curate(dataset, out, f"scorer={tmp_path}/other") == 1
    assert "scorer=" in (err := capsys.readouterr().err) and "config.json is not an mmfuse release config" in err
    # The settings of a run stopped before its first scan bind nothing: the corrected rerun goes ahead.
    (out / "scan").mkdir(parents=True)
    (out / "scan" / "settings.json").write_text('{"scorer": "a typo"}')
    assert curate(dataset, out) == 0
    assert curate(dataset, out, "max_image_pixels=1000") == 1  # once scans exist, they do bind
    assert "holds scans made with another scorer" in capsys.readouterr().err


def test_an_open_clip_checkpoint_scores_images_and_captions_as_the_release_does(noisy, scorer, tmp_path):
    import numpy as np

    dataset, _ = noisy
    assert (scorer / "open_clip_model.safetensors").is_file()  # a patch-stem release carries open_clip's files too
    common = ["dedup.near=false", "scorer_batch_size=16"]
    assert curate(dataset, tmp_path / "ours", f"scorer={scorer}", *common) == 0
    assert curate(dataset, tmp_path / "open_clip", f"scorer={scorer}/open_clip_model.safetensors",
                  f"open_clip_model={scorer}/open_clip_config.json", *common) == 0
    ours = pq.read_table(tmp_path / "ours" / "index.parquet")
    theirs = pq.read_table(tmp_path / "open_clip" / "index.parquet")
    # The same image and text towers read through open_clip's files: the same CLIP scores.
    a, b = (t["image_text_similarity"].to_numpy(zero_copy_only=False) for t in (ours, theirs))
    assert np.isfinite(a).sum() > 80 and np.array_equal(np.isfinite(a), np.isfinite(b))
    assert np.allclose(a[np.isfinite(a)], b[np.isfinite(b)], atol=1e-5)
    # open_clip has no audio tower: audio-text stays unscored and no audio embedding is written.
    assert np.isnan(theirs["audio_text_similarity"].to_numpy(zero_copy_only=False)).all()
    assert np.isfinite(ours["audio_text_similarity"].to_numpy(zero_copy_only=False)).any()
    scan = pq.read_table(tmp_path / "open_clip" / "scan" / "shard-000000.parquet")
    assert not np.asarray(scan["audio_embedding"].to_pylist(), dtype=np.float32).any()


def test_a_scorer_that_cannot_score_these_shards_is_one_line_before_any_shard_is_read(noisy, scorer, tmp_path, capsys):
    dataset, _ = noisy
    weights, architecture = f"scorer={scorer}/open_clip_model.safetensors", f"open_clip_model={scorer}/open_clip_config.json"
    cases = [
        ([weights], "is an open_clip weights file: set open_clip_model to its architecture"),
        ([weights, f"open_clip_model={tmp_path}/nosuch.json"], "does not exist"),
        ([f"scorer={scorer}", architecture], "is for an open_clip weights file"),
        # Read without their images (members.image matches nothing), the shards hold captions and audio only.
        ([weights, architecture, "members.image=none"], "embeds image, text, and input.path has audio, text: no "
         "image-caption or audio-caption pair to score"),
        ([weights, architecture, "semantic_dedup.clusters=4", "semantic_dedup.modality=audio"],
         "semantic_dedup.modality=audio has no embeddings to compare"),
    ]
    for overrides, message in cases:
        out = tmp_path / "out"
        assert curate(dataset, out, *overrides) == 1, overrides
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not (out / "scan").exists()


def test_similarity_rules_without_a_scorer_are_a_config_error(noisy, tmp_path, capsys):
    dataset, _ = noisy
    assert curate(dataset, tmp_path / "out", "similarity.min=0.3") == 2
    assert "set scorer=RELEASE" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_concept_balancing_caps_every_concept_and_keeps_the_tail(noisy, tmp_path, capsys):
    from data_pipeline.synth import CLASSES, PLURALS

    dataset, _ = noisy
    concepts = tmp_path / "concepts.txt"
    lines = ["# the shapes world's classes, singular and plural"]
    lines += [f"{name}\n{name.split()[0]} {PLURALS[name.split()[1]]}" for name in CLASSES]
    concepts.write_text("\n".join(lines) + "\n")
    rules = [f"balance.concepts_file={concepts}", "balance.max_per_concept=4", "balance.unmatched=drop",
             # The planted empty and spam captions (on copied pictures) reach the balancing, and name no concept.
             "captions.min_words=0", "captions.max_repeat=0", "dedup.exact=false", "dedup.near=false"]
    assert curate(dataset, tmp_path / "out", *rules) == 0
    index = pq.read_table(tmp_path / "out" / "index.parquet").to_pylist()
    summary = json.loads((tmp_path / "out" / "curate.json").read_text())
    kept = Counter(name for row in index if row["kept"] for name in row["concepts"])
    assert max(kept.values()) == 4 and summary["dropped"]["concept_over_cap"] > 20
    assert {name: counts["kept"] for name, counts in summary["concepts"].items() if counts["kept"]} == kept
    judged = [row for row in index if row["reason"] in ("", "concept_over_cap", "no_concept")]
    matched = Counter(name for row in judged for name in row["concepts"])
    tail = {name for name, n in matched.items() if n <= 4}
    assert tail and all(row["kept"] for row in judged if row["concepts"] and set(row["concepts"]) <= tail)
    assert [row["key"] for row in judged if not row["concepts"]] == [row["key"] for row in index if row["reason"] == "no_concept"]
    assert summary["dropped"]["no_concept"] == 8  # the planted empty and spam captions, two per shard
    report = (tmp_path / "out" / "REPORT.md").read_text()
    assert "| concept | matched | kept |" in report
    for outcome in ("kept", "concept_over_cap", "no_concept"):  # a contact sheet per outcome, linked from the report
        assert (tmp_path / "out" / "sheets" / f"{outcome}.png").read_bytes().startswith(b"\x89PNG")
        assert f"(sheets/{outcome}.png)" in report
    # Decided again from the same scans with the same seed: the same subset.
    assert curate(dataset, tmp_path / "out", *rules) == 0
    assert pq.read_table(tmp_path / "out" / "index.parquet").to_pylist() == index
    # A concept file that is not there: said before any shard is read.
    assert curate(dataset, tmp_path / "bad", f"balance.concepts_file={tmp_path}/nosuch.txt", "balance.max_per_concept=4") == 1
    assert "balance.concepts_file=" in capsys.readouterr().err and not (tmp_path / "bad" / "scan").exists()


def test_semantic_dedup_drops_copies_by_their_embeddings(noisy, scorer, tmp_path):
    dataset, planted = noisy
    out = tmp_path / "out"
    args = [f"scorer={scorer}", "dedup.exact=false", "dedup.near=false", "semantic_dedup.clusters=4",
            "semantic_dedup.threshold=0.999"]
    assert curate(dataset, out, *args) == 0
    index = {row["key"]: row for row in pq.read_table(out / "index.parquet").to_pylist()}
    # A byte-identical copy has its original's embedding and caption: the earlier one, the original, is kept.
    for key, (reason, original) in planted.items():
        if reason == "duplicate":
            assert (index[key]["reason"], index[key]["duplicate_of"]) == ("semantic_duplicate", original)
            assert index[original]["kept"]
    assert curate(dataset, out, *args) == 0  # the same seed and scans: the same subset
    again = pq.read_table(out / "index.parquet").select(["key", "reason", "duplicate_of"]).to_pylist()
    assert again == [{name: index[row["key"]][name] for name in row} for row in again]
    assert sum(row["reason"] == "semantic_duplicate" for row in again) >= 8
