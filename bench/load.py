"""Loader throughput, side by side: mmfuse's training loader vs open_clip's WebDataset loader vs a bare decode floor.

    .venv/bin/python bench/load.py [--samples 2048] [--workers 2] [--batch-size 64] [--repeat 2] [--audio] [--skip-open-clip]
                                   [--candidate DIR]

All contenders read the same shards (the shapes world at 256 px, made once into bench/_work/ with ``mmfuse synth``
and ``mmfuse shard``) and produce the same tensors: 224 px images through ``open_clip.image_transform(224,
is_train=True)`` and ViT-B-32's tokenizer, with the same number of worker processes:

- mmfuse: ``build_loader`` in exact mode (the default), batches of ``--batch-size``; the image+text row leaves audio
  members out (``members.audio=''``), the audio row adds ``[64, 200]`` log-mel spectrograms;
- open_clip: ``open_clip_train.data.get_wds_dataset(args, preprocess, is_train=True, tokenizer=...)`` in its own
  venv (bench/_work/venv-openclip, made on first use: its ``[training]`` extra pins an old webdataset), driven by
  a small script this file writes; it has no audio path, so it has no audio row;
- floor: every sample's bytes read into memory first, then a ``multiprocessing.Pool`` that only decodes (with
  TurboJPEG, the decoder mmfuse uses: the decoder is not the loader's merit), transforms and tokenizes (and, in
  the audio row, decodes the FLAC and computes the log-mel); no batching, nothing sent back;
- mmfuse-candidate (with ``--candidate DIR``): mmfuse again with ``DIR`` first on PYTHONPATH, where ``DIR/data_pipeline``
  is a changed copy of the loader: an A/B of a loader change in the same run.

Each contender is a child process. Throughput is timed inside it from the first batch on (loader start-up, worker
spawn and the shuffle buffer's fill are warm-up, excluded); the floor times its map after a warm-up that
initialises every pool worker. CPU time is that of the child's whole process tree over the same window, a measure
that other users of a shared machine disturb much less than wall time. Peak RSS is the largest sum over the tree
(main + workers), sampled every 50 ms with psutil. Every child sets ``torch.set_num_threads(1)`` in its main
process: DataLoader workers already run with one thread, and on a loaded 2-core machine two OpenMP threads make
the small per-image tensor ops 10-20x slower, which would measure the machine, not the loader.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WORK = BENCH / "_work"
OPEN_CLIP_VENV = WORK / "venv-openclip"
OPEN_CLIP_PACKAGES = ["open-clip-torch[training]", "torch==2.14.1", "torchvision==0.29.1", "psutil"]
IMAGE_SIZE, SOURCE_SIZE, SAMPLES_PER_SHARD = 224, 256, 256
MODEL = "ViT-B-32"


# ---------------------------------------------------------------------------------------------------- input data

def ensure_shards(samples: int) -> Path:
    """The shapes world at 256 px, sharded by mmfuse (256 samples per shard); made once per sample count."""
    shards = WORK / f"loader-shards-{samples}"
    if (shards / "dataset.json").exists():
        return shards
    raw = WORK / f"loader-raw-{samples}"
    log = WORK / f"loader-data-{samples}.log"
    print(f"making {samples} samples into {shards} (once) ...", flush=True)
    started = time.time()
    with open(log, "w") as out:
        for command in (
            ["synth", f"output.path={raw}", f"num_samples={samples}", f"image_size={SOURCE_SIZE}"],
            ["shard", f"input.path={raw}/manifest.parquet", f"output.path={shards}", f"image.size={SOURCE_SIZE}",
             f"output.samples_per_shard={SAMPLES_PER_SHARD}", "progress=false"],
        ):
            subprocess.run([sys.executable, "-m", "data_pipeline", *command], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, check=True)
    print(f"  done in {time.time() - started:.0f} s", flush=True)
    return shards


def shard_pattern(shards: Path) -> str:
    count = len(json.loads((shards / "sizes.json").read_text()))
    return str(shards / f"shard-{{000000..{count - 1:06d}}}.tar")


def ensure_open_clip() -> Path:
    python = OPEN_CLIP_VENV / "bin" / "python"
    probe = [str(python), "-c", "import open_clip_train.data, psutil"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"installing open_clip's trainer into {OPEN_CLIP_VENV} (once, ~3 min) ...", flush=True)
    subprocess.run(["python3", "-m", "venv", "--clear", str(OPEN_CLIP_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *OPEN_CLIP_PACKAGES], check=True)
    return python


# ------------------------------------------------------------------------------------- timing inside a contender

class Window:
    """Samples, wall time and process-tree CPU time from the first batch on; shared by every contender's child."""

    def __init__(self):
        self.me = psutil.Process()
        self.samples = self.first_samples = 0
        self.started = self.first = self.last = None
        self.cpu_first = self.cpu_last = self.main_first = self.main_last = 0.0
        self.shapes: dict[str, list[int]] = {}

    def main_cpu(self) -> float:
        times = self.me.cpu_times()
        return times.user + times.system

    def tree_cpu(self) -> float:
        total = 0.0
        for proc in [self.me, *self.me.children(recursive=True)]:
            try:
                times = proc.cpu_times()
            except psutil.Error:  # a worker that just exited
                continue
            total += times.user + times.system
        return total

    def start(self) -> None:
        self.started = time.perf_counter()

    def batch(self, size: int, **tensors) -> None:
        now = time.perf_counter()
        self.samples += size
        if self.first is None:
            self.first, self.first_samples, self.cpu_first, self.main_first = now, size, self.tree_cpu(), self.main_cpu()
            self.shapes = {name: list(t.shape) for name, t in tensors.items()}
        self.last, self.cpu_last, self.main_last = now, self.tree_cpu(), self.main_cpu()

    def result(self, **extra) -> dict:
        return {"samples": self.samples, "timed_samples": self.samples - self.first_samples,
                "seconds": self.last - self.first, "cpu_seconds": self.cpu_last - self.cpu_first,
                "main_cpu_seconds": self.main_last - self.main_first,
                "first_batch_seconds": self.first - self.started, "shapes": self.shapes, **extra}


def child_mmfuse(shards: str, workers: int, batch_size: int, audio: bool, result: str) -> None:
    import open_clip
    import torch

    from data_pipeline.config import LoaderConfig
    from data_pipeline.loader import build_loader
    from mmfuse.config import load_config

    torch.set_num_threads(1)
    window = Window()
    window.start()
    transform, tokenizer = open_clip.image_transform(IMAGE_SIZE, is_train=True), open_clip.get_tokenizer(MODEL)
    overrides = [f"train={shards}", f"batch_size={batch_size}", f"workers={workers}", "mode=exact"]
    if not audio:
        overrides.append("members.audio=''")  # image + text: the FLAC members are skipped unread
    cfg = load_config(LoaderConfig, [], overrides)
    loader = build_loader(cfg, rank=0, world_size=1, image_transform=transform, tokenizer=tokenizer, image_size=IMAGE_SIZE)
    has_audio = True
    for batch in loader:
        tensors = {"image": batch["image"], "text": batch["text"]}
        if audio:
            tensors["audio"] = batch["audio"]
            has_audio = has_audio and bool(batch["has_audio"].all())
        window.batch(len(batch["__key__"]), **tensors)
    metrics = loader.metrics()
    errors = {k: v for k, v in metrics.items() if k not in ("samples", "wait_seconds")}
    Path(result).write_text(json.dumps(window.result(errors=errors, all_have_audio=has_audio if audio else None,
                                                     loader_file=sys.modules[build_loader.__module__].__file__)))


# open_clip's side runs in its own venv; Window comes along as source so both sides time the same way.
OPEN_CLIP_DRIVER = '''
import argparse, json, sys, time
from pathlib import Path
import psutil, torch
import open_clip
from open_clip_train.data import get_wds_dataset

{window}

pattern, samples, workers, batch_size, result = sys.argv[1:6]
torch.set_num_threads(1)
window = Window()
window.start()
transform, tokenizer = open_clip.image_transform({image_size}, is_train=True), open_clip.get_tokenizer("{model}")
args = argparse.Namespace(
    train_data=pattern, val_data=None, train_num_samples=int(samples), val_num_samples=None, dataset_type="webdataset",
    dataset_resampled=False, train_data_upsampling_factors=None, batch_size=int(batch_size), workers=int(workers),
    world_size=1, rank=0, distributed=False, seed=0,
)
data = get_wds_dataset(args, transform, is_train=True, epoch=0, tokenizer=tokenizer)
data.set_epoch(0)
for images, texts in data.dataloader:
    window.batch(len(images), image=images, text=texts)
Path(result).write_text(json.dumps(window.result(num_batches=data.dataloader.num_batches)))
'''


def window_source() -> str:
    import inspect

    return inspect.getsource(Window)


# ----------------------------------------------------------------------------------------------------- the floor

_FLOOR: dict = {}  # filled before the pool forks: the workers inherit the samples without any copying over a pipe


def read_samples(shards: Path, audio: bool) -> list[tuple[bytes, str, bytes | None]]:
    """(jpg, caption, flac) of every sample, straight from the tars, in shard order."""
    samples = []
    for tar_path in sorted(shards.glob("*.tar")):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(tar_path) as tar:
            for info in tar:
                key, _, ext = info.name.partition(".")
                if ext in ("jpg", "txt", "flac"):
                    members.setdefault(key, {})[ext] = tar.extractfile(info).read()
        for parts in members.values():
            samples.append((parts["jpg"], parts["txt"].decode("utf-8").strip(), parts["flac"] if audio else None))
    return samples


def _floor_init() -> None:
    import open_clip
    import torch

    from data_pipeline.config import AudioFeatureConfig

    torch.set_num_threads(1)  # what a DataLoader worker does
    _FLOOR["transform"] = open_clip.image_transform(IMAGE_SIZE, is_train=True)
    _FLOOR["tokenizer"] = open_clip.get_tokenizer(MODEL)
    _FLOOR["audio_cfg"] = AudioFeatureConfig()
    _floor_work(range(min(8, len(_FLOOR["samples"]))))  # first calls pay for lazy imports and caches


def _floor_work(indices) -> int:
    from PIL import Image

    from data_pipeline.loader.decode import decode_audio
    from data_pipeline.image import decode_jpeg_fast

    transform, audio_cfg, samples = _FLOOR["transform"], _FLOOR["audio_cfg"], _FLOOR["samples"]
    captions = []
    for i in indices:
        jpg, caption, flac = samples[i]
        image = decode_jpeg_fast(jpg, None)  # the decoder mmfuse uses (TurboJPEG): the floor is what decoding costs
        transform(image if image is not None else Image.open(io.BytesIO(jpg)).convert("RGB"))
        captions.append(caption)
        if flac is not None:
            decode_audio(flac, audio_cfg)
    _FLOOR["tokenizer"](captions)
    return len(captions)


def _nap(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def child_floor(shards: str, workers: int, batch_size: int, audio: bool, result: str) -> None:
    import multiprocessing

    import torch

    torch.set_num_threads(1)
    window = Window()
    window.start()
    _FLOOR["samples"] = read_samples(Path(shards), audio)
    total = len(_FLOOR["samples"])
    chunks = [range(i, min(i + batch_size, total)) for i in range(0, total, batch_size)]
    with multiprocessing.get_context("fork").Pool(max(workers, 1), initializer=_floor_init) as pool:
        for _ in range(10):  # a worker naps only once its initializer is done: wait until every worker has napped
            if len(set(pool.map(_nap, [0.3] * max(workers, 1), chunksize=1))) == max(workers, 1):
                break
        window.batch(0)
        for done in pool.imap_unordered(_floor_work, chunks, chunksize=1):
            window.batch(done)
    Path(result).write_text(json.dumps(window.result()))


# ------------------------------------------------------------------------------------------------- measurement

@dataclass
class Run:
    name: str
    row: str
    samples_per_s: float
    samples_per_cpu_s: float
    peak_rss_mb: float
    main_rss_mb: float
    worker_rss_mb: float
    result: dict


class TreeRss(threading.Thread):
    """Peak of the summed RSS of a process tree, and each process's own peak, sampled every ``interval`` s."""

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.root, self.interval = psutil.Process(pid), interval
        self.peak_sum = 0
        self.peaks: dict[int, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            total = 0
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            for proc in procs:
                try:
                    rss = proc.memory_info().rss
                except psutil.Error:
                    continue
                total += rss
                self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0), rss)
            self.peak_sum = max(self.peak_sum, total)
            self.stop.wait(self.interval)


def measure(name: str, row: str, command: list[str], env: dict, result: Path) -> Run:
    result.unlink(missing_ok=True)
    log = result.with_suffix(".log")
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **env})
        watcher = TreeRss(proc.pid)
        watcher.start()
        code = proc.wait()
    watcher.stop.set()
    watcher.join()
    if code or not result.exists():
        sys.exit(f"{name} ({row}) failed (exit {code}); its output: {log}\n{log.read_text()[-3000:]}")
    data = json.loads(result.read_text())
    main_mb = watcher.peaks.get(proc.pid, 0) / 2**20
    workers = [v for pid, v in watcher.peaks.items() if pid != proc.pid]
    return Run(name, row, data["timed_samples"] / data["seconds"], data["timed_samples"] / max(data["cpu_seconds"], 1e-9),
               watcher.peak_sum / 2**20, main_mb, max(workers, default=0) / 2**20, data)


def best_of(runs: list[Run]) -> Run:
    """samples/s and samples/CPU-s each at their best over the rounds, peak RSS at its highest; the rest from the
    fastest round."""
    fastest = max(runs, key=lambda r: r.samples_per_s)
    return Run(fastest.name, fastest.row, fastest.samples_per_s, max(r.samples_per_cpu_s for r in runs),
               max(r.peak_rss_mb for r in runs), max(r.main_rss_mb for r in runs), max(r.worker_rss_mb for r in runs),
               fastest.result)


def contenders(args, shards: Path, python_oc: Path | None) -> list[tuple[str, str, list[str], dict]]:
    """(name, row, command, extra environment) of every run of one round."""
    me = [sys.executable, str(Path(__file__).resolve())]
    common = [str(shards), str(args.workers), str(args.batch_size)]
    rows = [("image+text", False)] + ([("image+text+audio", True)] if args.audio else [])
    runs = []
    for row, audio in rows:
        runs.append(("mmfuse", row, [*me, "--child", "mmfuse", *common, str(int(audio))], {}))
        if args.candidate:
            runs.append(("mmfuse-candidate", row, [*me, "--child", "mmfuse", *common, str(int(audio))],
                         {"PYTHONPATH": str(Path(args.candidate).resolve())}))
        if python_oc and not audio:
            runs.append(("open_clip", row, [str(python_oc), str(WORK / "openclip_driver.py"), shard_pattern(shards),
                                            str(args.samples), str(args.workers), str(args.batch_size)], {}))
        runs.append(("floor", row, [*me, "--child", "floor", *common, str(int(audio))], {}))
    return runs


def check(run: Run, args) -> list[str]:
    """What would make a run incomparable: lost samples, decode errors, other shapes."""
    problems, r = [], run.result
    if r["samples"] != args.samples:
        problems.append(f"{run.name} ({run.row}) delivered {r['samples']} of {args.samples} samples")
    if r.get("errors"):
        problems.append(f"{run.name} ({run.row}) counted errors {r['errors']}")
    if r.get("all_have_audio") is False:
        problems.append(f"{run.name} ({run.row}) had samples without audio")
    shapes = r.get("shapes", {})
    if "image" in shapes and shapes["image"][1:] != [3, IMAGE_SIZE, IMAGE_SIZE]:
        problems.append(f"{run.name} image shape {shapes['image']}")
    if "text" in shapes and shapes["text"][1:] != [77]:
        problems.append(f"{run.name} text shape {shapes['text']}")
    return problems


# ------------------------------------------------------------------------------------------------------ report

def table(runs: list[Run], workers: int) -> str:
    header = ("row", "contender", "samples/s", "samples/CPU-s", "cores used", "main CPU %", "peak RSS MB: sum (main + workers)", "start-up s")
    rows = [header]
    for r in runs:
        cpu, seconds = r.result["cpu_seconds"], r.result["seconds"]
        memory = f"{r.peak_rss_mb:.0f} ({r.main_rss_mb:.0f} + {max(workers, 1)}x{r.worker_rss_mb:.0f})" if r.worker_rss_mb else f"{r.peak_rss_mb:.0f}"
        rows.append((r.row, r.name, f"{r.samples_per_s:.0f}", f"{r.samples_per_cpu_s:.0f}", f"{cpu / seconds:.2f}",
                     f"{100 * r.result['main_cpu_seconds'] / max(cpu, 1e-9):.0f}", memory, f"{r.result['first_batch_seconds']:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def ratios(runs: list[Run], workers: int) -> list[str]:
    by = {(r.name, r.row): r for r in runs}
    lines = []
    for row in dict.fromkeys(r.row for r in runs):
        for me in ("mmfuse", "mmfuse-candidate"):
            mine = by.get((me, row))
            for other, target in (("open_clip", 1.2), ("floor", 0.8)):
                theirs = by.get((other, row))
                if mine is None or theirs is None:
                    continue
                wall = mine.samples_per_s / theirs.samples_per_s
                cpu = mine.samples_per_cpu_s / theirs.samples_per_cpu_s
                verdict = "meets" if wall >= target else "misses"
                lines.append(f"{row}: {me} / {other} = {wall:.2f}x samples/s ({verdict} target >= {target}x), "
                             f"{cpu:.2f}x samples per CPU-s; {workers} workers each")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=2048, help="samples in the benchmark dataset (default 2048)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of every contender (default 2)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    parser.add_argument("--repeat", type=int, default=2, help="rounds; each contender's best is reported (default 2)")
    parser.add_argument("--audio", action="store_true", help="add a row with audio log-mel (mmfuse and floor)")
    parser.add_argument("--skip-open-clip", action="store_true", help="leave open_clip out (no venv install)")
    parser.add_argument("--candidate", metavar="DIR", help="also run mmfuse with DIR first on PYTHONPATH (a folder holding a "
                        "changed copy of data_pipeline/), to A/B a loader change against the checked-out one")
    parser.add_argument("--child", nargs=6, metavar=("KIND", "SHARDS", "WORKERS", "BATCH", "AUDIO", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, shards, workers, batch, audio, result = args.child
        child = {"mmfuse": child_mmfuse, "floor": child_floor}[kind]
        return child(shards, int(workers), int(batch), audio == "1", result)

    started = time.time()
    out = WORK / "load"
    out.mkdir(parents=True, exist_ok=True)
    shards = ensure_shards(args.samples)
    python_oc = None if args.skip_open_clip else ensure_open_clip()
    if python_oc:
        (WORK / "openclip_driver.py").write_text(OPEN_CLIP_DRIVER.format(window=window_source(), image_size=IMAGE_SIZE, model=MODEL))

    load_before = os.getloadavg()[0]
    plan = contenders(args, shards, python_oc)
    rounds: dict[tuple[str, str], list[Run]] = {(name, row): [] for name, row, _, _ in plan}
    for attempt in range(args.repeat):
        print(f"round {attempt + 1}:", end="", flush=True)
        for name, row, command, env in plan if attempt % 2 == 0 else plan[::-1]:  # odd rounds run in reverse order
            result = out / f"{name}-{row}-{attempt}.json"
            run = measure(name, row, [*command, str(result)], env, result)
            rounds[(name, row)].append(run)
            print(f" | {name} {row} {run.samples_per_s:.0f}/s {run.samples_per_cpu_s:.0f}/CPU-s", end="", flush=True)
        print()
    runs = [best_of(found) for found in rounds.values()]

    print()
    print(f"{args.samples} samples (256 px jpg + caption{' + 2 s flac' if args.audio else ''}, {SAMPLES_PER_SHARD}/shard) -> "
          f"{IMAGE_SIZE} px open_clip train transform + {MODEL} tokens{' (+ 64x200 log-mel)' if args.audio else ''}; "
          f"batch {args.batch_size}; {args.workers} workers; {os.cpu_count()} cores "
          f"({platform.processor() or platform.machine()}, 1-min load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after); {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"samples/s and samples/CPU-s: each the best of {args.repeat} rounds; peak RSS: the highest; cores used and start-up: "
          f"the fastest round")
    print(table(runs, args.workers))
    for line in ratios(runs, args.workers):
        print(line)
    if args.candidate:
        print("mmfuse-candidate's loader: " + ", ".join(sorted({r.result["loader_file"] for r in runs if r.name == "mmfuse-candidate"})))
    problems = sorted({p for found in rounds.values() for r in found for p in check(r, args)})
    print("outputs comparable: " + ("yes (every sample delivered once, no errors, same shapes)" if not problems else "; ".join(problems)))
    print(f"(bench took {time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
