"""The shapes world: determinism, manifest contract, and that every modality really encodes the scene."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from PIL import Image

from data_pipeline import synth
from data_pipeline.config import SynthConfig
from mmfuse.config import ConfigError

NUM_SAMPLES = 16


def _generate(path: Path, num_samples: int = NUM_SAMPLES, seed: int = 0) -> Path:
    cfg = SynthConfig(num_samples=num_samples, seed=seed, image_size=96)
    cfg.output.path = str(path)
    return synth.run(cfg)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return _generate(tmp_path_factory.mktemp("synth")).parent


@pytest.fixture(scope="module")
def rows(dataset) -> list[dict]:
    return pq.read_table(dataset / "manifest.parquet").to_pylist()


def test_same_seed_gives_identical_bytes(dataset, rows, tmp_path):
    again = _generate(tmp_path / "again").parent
    assert pq.read_table(again / "manifest.parquet").to_pylist() == rows
    for row in rows:
        for column in ("image", "audio"):
            assert (again / row[column]).read_bytes() == (dataset / row[column]).read_bytes(), row[column]


def test_worker_processes_write_the_same_bytes(dataset, rows, tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "CHUNK", 3)  # 16 samples in 6 ranges over 2 processes
    cfg = SynthConfig(num_samples=NUM_SAMPLES, seed=0, image_size=96, workers=2)
    cfg.output.path = str(tmp_path / "pooled")
    pooled = synth.run(cfg).parent
    assert pq.read_table(pooled / "manifest.parquet").to_pylist() == rows
    for row in rows:
        for column in ("image", "audio"):
            assert (pooled / row[column]).read_bytes() == (dataset / row[column]).read_bytes(), row[column]


def test_different_seeds_differ(dataset, rows, tmp_path):
    other = _generate(tmp_path / "other", seed=1).parent
    other_rows = pq.read_table(other / "manifest.parquet").to_pylist()
    assert sum(a["objects"] != b["objects"] for a, b in zip(rows, other_rows)) > NUM_SAMPLES // 2
    assert (other / rows[0]["image"]).read_bytes() != (dataset / rows[0]["image"]).read_bytes()


def test_helpers_are_pure_functions_of_seed_and_index():
    assert synth.make_scene(7, 3) == synth.make_scene(7, 3)
    assert synth.make_scene(7, 3) != synth.make_scene(7, 4)
    scene = synth.make_scene(7, 3)
    assert np.array_equal(np.asarray(synth.render_image(scene, 64)), np.asarray(synth.render_image(scene, 64)))
    assert np.array_equal(synth.render_audio(scene, 8000, 0.5), synth.render_audio(scene, 8000, 0.5))


def test_manifest_schema_and_files(dataset, rows):
    table = pq.read_table(dataset / "manifest.parquet")
    expected = {
        "id": pa.string(), "image": pa.string(), "text": pa.string(), "audio": pa.string(), "label": pa.int64(),
        "label_name": pa.string(), "captions": pa.list_(pa.string()), "question_id": pa.int64(),
        "question": pa.string(), "question_type": pa.string(), "answers": pa.list_(pa.string()),
        "objects": pa.string(),
    }
    assert {f.name: f.type for f in table.schema} == expected
    assert table.num_rows == NUM_SAMPLES
    assert [row["id"] for row in rows] == [f"{i:06d}" for i in range(NUM_SAMPLES)]
    assert len({row["question_id"] for row in rows}) == NUM_SAMPLES
    for row in rows:
        assert row["image"] == f"images/{row['id']}.jpg" and row["audio"] == f"audio/{row['id']}.flac"
        assert Image.open(dataset / row["image"]).size == (96, 96)
    assert json.loads((dataset / "classes.json").read_text()) == synth.CLASSES
    assert len(synth.CLASSES) == len(synth.COLORS) * len(synth.SHAPES) == 30
    assert json.loads((dataset / "synth.json").read_text())["num_samples"] == NUM_SAMPLES


def test_label_is_the_largest_object(rows):
    for row in rows:
        largest = max(json.loads(row["objects"]), key=lambda obj: obj["radius"])
        assert row["label_name"] == f"{largest['color']} {largest['shape']}"
        assert synth.CLASSES[row["label"]] == row["label_name"]


def test_captions_name_every_object(rows):
    for row in rows:
        assert len(row["captions"]) == 5 and len(set(row["captions"])) == 5
        assert row["text"] in row["captions"]
        for caption in row["captions"]:
            for obj in json.loads(row["objects"]):
                assert obj["color"] in caption and obj["shape"] in caption, (caption, obj)


def _spectrum(clip: np.ndarray, sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
    return np.fft.rfftfreq(len(clip), 1 / sample_rate), np.abs(np.fft.rfft(clip * np.hanning(len(clip))))


def test_audio_peaks_at_each_objects_colour_pitch(dataset, rows):
    for row in rows:
        audio, sample_rate = sf.read(dataset / row["audio"], dtype="float32")
        assert audio.ndim == 1 and len(audio) == 2 * sample_rate and np.abs(audio).max() <= 1
        objects = json.loads(row["objects"])
        slot = len(audio) // len(objects)
        for i, obj in enumerate(objects):  # one tone per object, in order; the fundamental is its loudest partial
            freqs, magnitude = _spectrum(audio[i * slot:(i + 1) * slot], sample_rate)
            pitch = synth.COLORS[obj["color"]][1]
            assert abs(freqs[magnitude.argmax()] - pitch) < 0.02 * pitch, (row["id"], obj)


def test_audio_timbre_follows_shape_and_loudness_follows_size():
    def obj(shape: str, size: str) -> synth.SceneObject:
        return synth.SceneObject("red", shape, size, "center", 0.5, 0.5, synth.RADIUS[size], (255, 0, 0))

    scene = synth.Scene((obj("circle", "large"), obj("star", "small")), noise_seed=0)
    audio = synth.render_audio(scene, 16000, 2.0)
    circle, star = audio[:16000], audio[16000:]
    pitch = synth.COLORS["red"][1]

    def second_harmonic_ratio(clip):
        freqs, magnitude = _spectrum(clip, 16000)
        return magnitude[np.abs(freqs - 2 * pitch).argmin()] / magnitude[np.abs(freqs - pitch).argmin()]

    assert second_harmonic_ratio(circle) < 0.02  # a sine has no overtones
    assert second_harmonic_ratio(star) > 0.3  # a sawtooth's 2nd partial is half the fundamental
    assert np.sqrt(np.mean(circle**2)) > 1.5 * np.sqrt(np.mean(star**2))


def _true_answer(question: str, objects: list[dict]) -> str:
    words = question.rstrip("?").split()
    if question.startswith("what color is the"):
        return next(o["color"] for o in objects if o["shape"] == words[-1])
    if question.startswith("what shape is the"):
        return next(o["shape"] for o in objects if o["color"] == words[-2])
    if question == "how many shapes are there?":
        return str(len(objects))
    if words[-3] == "objects":
        return str(sum(o["color"] == words[-4] for o in objects))
    return str(sum(synth.PLURALS[o["shape"]] == words[-3] for o in objects))


def test_vqa_majority_answer_is_correct(rows):
    assert {row["question_type"] for row in rows} <= {"color", "shape", "count"}
    for row in rows:
        answers = row["answers"]
        assert len(answers) == 10 and all(a == a.lower() for a in answers)
        truth = _true_answer(row["question"], json.loads(row["objects"]))
        majority, votes = Counter(answers).most_common(1)[0]
        assert majority == truth and votes >= 7, (row["question"], answers, truth)


def test_vqa_over_many_scenes_disagrees_but_never_outvotes_the_truth():
    disagreements = 0
    for index in range(300):  # the pure helpers alone: rare annotator draws need more than a few samples
        scene = synth.make_scene(5, index)
        question, kind, answers = synth.vqa(scene, np.random.default_rng([5, index]))
        objects = [{"color": o.color, "shape": o.shape} for o in scene.objects]
        truth = _true_answer(question, objects)
        assert len(answers) == 10 and answers.count(truth) >= 7, (question, answers)
        disagreements += answers.count(truth) < 10
    assert 0.3 < disagreements / 300 < 0.9


def test_background_is_textured(dataset, rows):
    jpeg = (dataset / rows[0]["image"]).read_bytes()
    pixels = np.asarray(Image.open(io.BytesIO(jpeg)), dtype=np.float32)
    corner = pixels[:8, :8]  # the corner is always background
    assert corner.std() > 3  # smooth noise and gradient: not a flat colour
    assert np.diff(corner, axis=1).std() > 2  # pixel-level grain survives the JPEG (about 0.6 without it)
    flat = io.BytesIO()
    Image.new("RGB", (96, 96), (128, 128, 128)).save(flat, format="JPEG", quality=92)
    assert len(jpeg) > 3 * len(flat.getvalue())


def test_rerun_with_fewer_samples_leaves_a_clean_folder(tmp_path):
    _generate(tmp_path, num_samples=6)
    manifest = _generate(tmp_path, num_samples=3)
    assert pq.read_table(manifest).num_rows == 3
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["000000.jpg", "000001.jpg", "000002.jpg"]
    assert len(list((tmp_path / "audio").iterdir())) == 3


def test_cli(tmp_path, capsys):
    manifest = synth.main([f"output.path={tmp_path}", "num_samples=4", "seed=3", "image_size=64"])
    assert manifest == tmp_path / "manifest.parquet" and pq.read_table(manifest).num_rows == 4
    assert json.loads((tmp_path / "synth.json").read_text())["seed"] == 3
    with pytest.raises(SystemExit) as exit_info:
        synth.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "mmfuse synth" in out and "output.path" in out and "num_samples" in out
    with pytest.raises(ConfigError, match="num_sample"):
        synth.main([f"output.path={tmp_path}", "num_sample=4"])
    with pytest.raises(ConfigError, match="workers must be >= 0"):
        synth.main([f"output.path={tmp_path}", "workers=-1"])
