"""The shapes world: a synthetic image-text-audio dataset that a tiny model can learn on a CPU in minutes.

Each scene holds 1-3 coloured shapes. From one scene come a JPEG (shapes over a textured background), five
reference captions, a FLAC clip that plays one tone per object (pitch = colour, timbre = shape, loudness = size),
a class label (colour + shape of the largest object) and one VQA question with ten annotator answers. The same
samples are also written as standard task files (COCO captions, VQA v2 questions + annotations, class folders).

Everything is a pure function of (seed, index): each sample draws from its own ``np.random.default_rng([seed,
index, stream])``, so any sample can be regenerated alone and two runs with one seed give identical bytes.

    mmfuse synth output.path=DIR num_samples=N seed=S
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import multiprocessing
import os
import shutil
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
from PIL import Image, ImageDraw

from data_pipeline.config import SynthConfig
from mmfuse.config import parse_args, to_dict
from mmfuse.progress import progress

# Pitch rises along the rainbow. Neighbours are ~1.3x apart, a ratio chosen so that no low harmonic of one
# colour lands within a few percent of another colour's fundamental.
COLORS = {
    "red": ((215, 40, 40), 240.0),
    "orange": ((240, 140, 30), 310.0),
    "yellow": ((240, 215, 40), 405.0),
    "green": ((50, 165, 60), 525.0),
    "blue": ((45, 85, 215), 685.0),
    "purple": ((135, 60, 185), 890.0),
}
# Timbre per shape as (harmonic numbers, amplitudes); the fundamental is always the loudest partial.
TIMBRES = {
    "circle": ((1,), (1.0,)),  # sine
    "square": ((1, 3, 5, 7, 9), (1.0, 1 / 3, 1 / 5, 1 / 7, 1 / 9)),  # square wave
    "triangle": ((1, 3, 5, 7), (1.0, -1 / 9, 1 / 25, -1 / 49)),  # triangle wave
    "star": ((1, 2, 3, 4, 5, 6), (1.0, 1 / 2, 1 / 3, 1 / 4, 1 / 5, 1 / 6)),  # sawtooth
    "cross": ((1, 2, 4), (1.0, 0.7, 0.5)),  # even partials, organ-like
}
SHAPES = tuple(TIMBRES)
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses"}
POSITIONS = {"left": (0.2, 0.5), "right": (0.8, 0.5), "top": (0.5, 0.2), "bottom": (0.5, 0.8), "center": (0.5, 0.5)}
PLACE_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                 "center": "in the center"}
RADIUS = {"small": 0.085, "large": 0.16}  # fraction of the image side
LOUDNESS = {"small": 0.4, "large": 0.8}
CLASSES = sorted(f"{color} {shape}" for color in COLORS for shape in SHAPES)
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
SYNONYMS = {"red": "crimson", "orange": "amber", "yellow": "gold", "green": "lime", "blue": "navy",
            "purple": "violet", "circle": "round", "square": "rectangle", "triangle": "triangular",
            "star": "star shape", "cross": "plus"}
PREFIXES = ("", "a photo of ", "an image of ", "a picture of ", "a drawing of ")


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    size: str
    position: str
    x: float  # centre and radius as fractions of the image side
    y: float
    radius: float
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    noise_seed: int  # seeds the background texture and the audio noise, so rendering stays a function of the scene

    @property
    def largest(self) -> SceneObject:
        return max(self.objects, key=lambda obj: obj.radius)


def make_scene(seed: int, index: int) -> Scene:
    """1-3 objects at distinct positions; in a multi-object scene exactly one is large, so the label is unambiguous."""
    rng = np.random.default_rng([seed, index, 0])
    count = int(rng.choice([1, 2, 3], p=[0.35, 0.35, 0.3]))
    positions = rng.choice(list(POSITIONS), size=count, replace=False)
    large = int(rng.integers(count)) if count > 1 or rng.random() < 0.7 else -1
    objects = []
    for i, position in enumerate(positions):
        color, shape = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
        if i > 0 and rng.random() < 0.2:  # repeats make "two red circles" and count questions interesting
            color, shape = objects[0].color, objects[0].shape
        size = "large" if i == large else "small"
        cx, cy = POSITIONS[position] + rng.uniform(-0.03, 0.03, size=2)
        radius = RADIUS[size] * rng.uniform(0.88, 1.12)
        rgb = np.clip(np.array(COLORS[color][0]) + rng.integers(-18, 19, size=3), 0, 255)
        objects.append(SceneObject(color, shape, size, str(position), round(float(cx), 4), round(float(cy), 4),
                                   round(float(radius), 4), tuple(int(v) for v in rgb)))
    return Scene(tuple(objects), int(rng.integers(2**31)))


def render_image(scene: Scene, size: int) -> Image.Image:
    """Shapes over smooth coloured noise, then a lighting gradient and sensor-like grain over everything."""
    rng = np.random.default_rng([scene.noise_seed, 1])
    # A 5x5 grid of grey-ish colours (one tint, mostly brightness changes) upsampled into smooth blotches.
    coarse = rng.uniform(70, 170) + rng.normal(0, 12, 3) + rng.normal(0, 25, (5, 5, 1)) + rng.normal(0, 6, (5, 5, 3))
    image = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for obj in sorted(scene.objects, key=lambda o: -o.radius):  # small shapes on top, never hidden
        if obj.shape == "circle":
            draw.ellipse(_box(obj, size), fill=obj.rgb)
        else:
            draw.polygon(_outline(obj, size), fill=obj.rgb)
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    light = rng.uniform(5, 25) * (np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None])
    pixels = np.asarray(image, dtype=np.int16) + light.astype(np.int16)[..., None]
    pixels += rng.integers(-9, 10, size=(size, size, 3), dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _box(obj: SceneObject, size: int) -> list[float]:
    cx, cy, r = obj.x * size, obj.y * size, obj.radius * size
    return [cx - r, cy - r, cx + r, cy + r]


def _outline(obj: SceneObject, size: int) -> list[tuple[float, float]]:
    cx, cy, r = obj.x * size, obj.y * size, obj.radius * size
    if obj.shape == "square":
        h = 0.85 * r  # about the area of the circle of radius r
        unit = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif obj.shape == "triangle":
        unit = [(r * np.cos(a), r * np.sin(a)) for a in np.radians([-90, 30, 150])]
    elif obj.shape == "star":
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        angles = np.radians(-90 + 36 * np.arange(10))
        unit = list(zip(radii * np.cos(angles), radii * np.sin(angles)))
    else:  # cross: a plus sign with arms 0.6 r wide
        a, w = r, 0.3 * r
        unit = [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w), (-a, -w),
                (-w, -w)]
    return [(cx + float(dx), cy + float(dy)) for dx, dy in unit]


def render_audio(scene: Scene, sample_rate: int, seconds: float) -> np.ndarray:
    """One tone per object, in scene order, each filling an equal slot: float32 mono in [-1, 1]."""
    rng = np.random.default_rng([scene.noise_seed, 2])
    total = int(round(sample_rate * seconds))
    slot = total // len(scene.objects)
    fade = min(slot // 2, int(0.02 * sample_rate))
    envelope = np.ones(slot, dtype=np.float32)  # raised-cosine fade in and out, so slot boundaries do not click
    ramp = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, fade, dtype=np.float32))
    envelope[:fade], envelope[slot - fade:] = ramp, ramp[::-1]
    audio = 0.005 * rng.standard_normal(total, dtype=np.float32)
    for i, obj in enumerate(scene.objects):
        tone = _tone(COLORS[obj.color][1], obj.shape, slot, sample_rate)
        audio[i * slot:(i + 1) * slot] += LOUDNESS[obj.size] * envelope * tone / np.abs(tone).max()
    return np.clip(audio, -1, 1)


def _tone(pitch: float, shape: str, length: int, sample_rate: int) -> np.ndarray:
    """Additive synthesis of the shape's partials, dropping any above 0.45 x sample_rate (no aliasing)."""
    # The phase is wrapped to one cycle in float64 first, so float32 (fast, vectorised) sin stays exact enough.
    cycles = np.arange(length) * (pitch / sample_rate) % 1.0
    phase = (2 * np.pi * cycles).astype(np.float32)
    tone = np.zeros(length, dtype=np.float32)
    for k, amplitude in zip(*TIMBRES[shape]):
        if k * pitch < 0.45 * sample_rate:
            tone += np.float32(amplitude) * np.sin(k * phase)
    return tone


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _grouped(objects: tuple[SceneObject, ...]) -> str:
    """Identical colour+shape pairs counted, in first-seen order: "two red circles and a blue square"."""
    counts = Counter((obj.color, obj.shape) for obj in objects)
    return _join([_a(f"{color} {shape}") if n == 1 else f"{NUMBER_WORDS[n]} {color} {PLURALS[shape]}"
                  for (color, shape), n in counts.items()])


def _described(objects: tuple[SceneObject, ...], size: bool, place: bool) -> str:
    """One phrase per object: "a small green triangle at the top and a large blue star on the left"."""
    phrases = []
    for obj in objects:
        phrase = _a(f"{obj.size} {obj.color} {obj.shape}" if size else f"{obj.color} {obj.shape}")
        phrases.append(f"{phrase} {PLACE_PHRASES[obj.position]}" if place else phrase)
    return _join(phrases)


def _there(listing: str) -> str:
    # English agrees with the first item: "there is a red circle and two stars", "there are two red circles".
    return ("there are " if listing.split()[0] in NUMBER_WORDS else "there is ") + listing


TEMPLATES = (
    lambda objs, prefix: prefix + _grouped(objs),
    lambda objs, prefix: prefix + _described(objs, size=True, place=False),
    lambda objs, prefix: prefix + _described(objs, size=False, place=True),
    lambda objs, prefix: prefix + _described(objs, size=True, place=True),
    lambda objs, prefix: _there(_grouped(objs)),
    lambda objs, prefix: f"{NUMBER_WORDS[len(objs)]} shape{'s' * (len(objs) > 1)}: " + _grouped(objs),
)


def captions(scene: Scene, rng: np.random.Generator, count: int = 5) -> list[str]:
    """``count`` captions from distinct templates; every one names the colour and shape of every object."""
    chosen = rng.choice(len(TEMPLATES), size=count, replace=False)
    result = []
    for template in chosen:
        order = tuple(scene.objects[i] for i in rng.permutation(len(scene.objects)))
        result.append(TEMPLATES[template](order, PREFIXES[rng.integers(len(PREFIXES))]))
    return result


def vqa(scene: Scene, rng: np.random.Generator) -> tuple[str, str, list[str]]:
    """One question (colour, shape or count) and ten annotator answers, at least seven of them correct."""
    colors = Counter(obj.color for obj in scene.objects)
    shapes = Counter(obj.shape for obj in scene.objects)
    kinds = ["count"]  # colour and shape questions need an object whose shape (colour) occurs once
    kinds += ["color"] * any(n == 1 for n in shapes.values()) + ["shape"] * any(n == 1 for n in colors.values())
    kind = str(rng.choice(kinds))
    if kind == "color":
        shape = str(rng.choice([s for s, n in shapes.items() if n == 1]))
        truth = next(obj.color for obj in scene.objects if obj.shape == shape)
        question, wrong = f"what color is the {shape}?", [c for c in COLORS if c != truth]
    elif kind == "shape":
        color = str(rng.choice([c for c, n in colors.items() if n == 1]))
        truth = next(obj.shape for obj in scene.objects if obj.color == color)
        question, wrong = f"what shape is the {color} object?", [s for s in SHAPES if s != truth]
    else:
        target = int(rng.integers(3))
        if target == 0:
            question, n = "how many shapes are there?", len(scene.objects)
        elif target == 1:  # mostly a colour in the scene; sometimes an absent one, answer 0
            color = str(rng.choice(list(colors) if rng.random() < 0.85 else list(COLORS)))
            question, n = f"how many {color} objects are there?", colors[color]
        else:
            shape = str(rng.choice(list(shapes) if rng.random() < 0.85 else list(SHAPES)))
            question, n = f"how many {PLURALS[shape]} are there?", shapes[shape]
        truth, wrong = str(n), [str(m) for m in (n - 1, n + 1) if m >= 0]
    synonym = NUMBER_WORDS[int(truth)] if kind == "count" else SYNONYMS[truth]
    return question, kind, _annotate(truth, wrong, synonym, rng)


def _annotate(truth: str, wrong: list[str], synonym: str, rng: np.random.Generator) -> list[str]:
    """Ten answers with VQA-like disagreement: the rest of the annotators give a synonym or a wrong answer."""
    correct = int(rng.choice([7, 8, 9, 10], p=[0.1, 0.2, 0.35, 0.35]))
    others = [synonym if rng.random() < 0.5 else str(rng.choice(wrong)) for _ in range(10 - correct)]
    return [str(a) for a in rng.permutation([truth] * correct + others)]


def make_row(seed: int, index: int, scene: Scene) -> dict:
    """The manifest row of one sample; the text fields draw from their own streams of (seed, index)."""
    refs = captions(scene, np.random.default_rng([seed, index, 3]))
    question, kind, answers = vqa(scene, np.random.default_rng([seed, index, 4]))
    label_name = f"{scene.largest.color} {scene.largest.shape}"
    key = f"{index:06d}"
    return {"id": key, "image": f"images/{key}.jpg", "text": refs[0], "audio": f"audio/{key}.flac",
            "label": CLASSES.index(label_name), "label_name": label_name, "captions": refs, "question_id": index,
            "question": question, "question_type": kind, "answers": answers,
            "objects": json.dumps([{k: v for k, v in asdict(obj).items() if k != "rgb"} for obj in scene.objects])}


MANIFEST_SCHEMA = pa.schema([
    ("id", pa.string()), ("image", pa.string()), ("text", pa.string()), ("audio", pa.string()),
    ("label", pa.int64()), ("label_name", pa.string()), ("captions", pa.list_(pa.string())),
    ("question_id", pa.int64()), ("question", pa.string()), ("question_type", pa.string()),
    ("answers", pa.list_(pa.string())), ("objects", pa.string()),
])


def _write_atomic(path: Path, data: bytes) -> None:
    # A killed run leaves at most a .tmp file behind, never a truncated image a later stage would trust.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _encode_flac(audio: np.ndarray, sample_rate: int) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, audio, sample_rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def run(cfg: SynthConfig) -> Path:
    """Write images/, audio/, classes.json, synth.json and, last, manifest.parquet; return the manifest path."""
    out = Path(cfg.output.path).expanduser()
    manifest = out / "manifest.parquet"
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "audio").mkdir(exist_ok=True)
    manifest.unlink(missing_ok=True)  # the manifest marks a finished folder, so it goes first and comes back last
    # Every sample is a pure function of (seed, index), so ranges of indices render in any process and order: the
    # same bytes with any number of workers.
    chunks = [range(start, min(start + CHUNK, cfg.num_samples)) for start in range(0, cfg.num_samples, CHUNK)]
    workers = min(cfg.workers or os.cpu_count() or 1, len(chunks))
    render, rows = functools.partial(_render_range, cfg, out), []
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else contextlib.nullcontext()
    with progress(cfg.num_samples, "synth", "sample", disable=cfg.num_samples < 1000) as bar, pool:
        for done in (pool.imap(render, chunks) if workers > 1 else map(render, chunks)):
            rows.extend(done)
            bar.update(len(done))
    _remove_stale(out, cfg.num_samples)
    write_standard_files(out, rows)
    _write_atomic(out / "classes.json", json.dumps(CLASSES, indent=1).encode())
    _write_atomic(out / "synth.json", json.dumps(to_dict(cfg), indent=1).encode())
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), buffer)
    _write_atomic(manifest, buffer.getvalue().to_pybytes())
    return manifest


CHUNK = 256  # samples per task of the worker pool


def _render_range(cfg: SynthConfig, out: Path, indices: range) -> list[dict]:
    """Write the image and clip of each sample in ``indices``; their manifest rows, in order."""
    rows = []
    for index in indices:
        scene = make_scene(cfg.seed, index)
        row = make_row(cfg.seed, index, scene)
        jpeg = io.BytesIO()
        render_image(scene, cfg.image_size).save(jpeg, format="JPEG", quality=cfg.jpeg_quality)
        _write_atomic(out / row["image"], jpeg.getvalue())
        audio = render_audio(scene, cfg.audio_sample_rate, cfg.audio_seconds)
        _write_atomic(out / row["audio"], _encode_flac(audio, cfg.audio_sample_rate))
        rows.append(row)
    return rows


def write_standard_files(out: Path, rows: list[dict]) -> None:
    """The same samples as the standard task files fine-tuning reads: COCO captions JSON, VQA v2 questions and
    annotations JSON (with an ``images`` list naming the files), and a class-per-folder tree (hard links)."""
    images = [{"id": int(r["id"]), "file_name": r["image"]} for r in rows]
    coco = {"images": images, "annotations": [
        {"id": int(r["id"]) * 10 + j, "image_id": int(r["id"]), "caption": c} for r in rows for j, c in enumerate(r["captions"])]}
    questions = {"data_subtype": "shapes", "images": images, "questions": [
        {"question_id": r["question_id"], "image_id": int(r["id"]), "question": r["question"]} for r in rows]}
    annotations = {"data_subtype": "shapes", "annotations": [
        {"question_id": r["question_id"], "image_id": int(r["id"]), "question_type": r["question_type"],
         "answer_type": "number" if r["question_type"] == "count" else "other",
         "answers": [{"answer": a, "answer_id": j + 1} for j, a in enumerate(r["answers"])]} for r in rows]}
    for name, value in (("coco_captions.json", coco), ("vqa_questions.json", questions), ("vqa_annotations.json", annotations)):
        _write_atomic(out / name, json.dumps(value).encode())
    classes = out / "classes"
    if classes.exists():
        shutil.rmtree(classes)
    for r in rows:
        folder = classes / r["label_name"]
        folder.mkdir(parents=True, exist_ok=True)
        os.link(out / r["image"], folder / f"{r['id']}.jpg")


def _remove_stale(out: Path, num_samples: int) -> None:
    """Drop samples a previous, larger run left behind, so the folder matches the new manifest."""
    for folder, suffix in (("images", ".jpg"), ("audio", ".flac")):
        for path in (out / folder).glob(f"[0-9][0-9][0-9][0-9][0-9][0-9]{suffix}"):
            if int(path.stem) >= num_samples:
                path.unlink()


def main(argv: list[str] | None = None) -> Path:
    return run(parse_args(SynthConfig, argv, prog="mmfuse synth",
                          description="Generate the synthetic shapes world: JPEG + caption + FLAC + label + VQA."))


if __name__ == "__main__":
    main()
