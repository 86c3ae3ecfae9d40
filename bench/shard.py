"""Sharding throughput, side by side: ``mmfuse shard`` vs img2dataset vs a bare decode → resize → encode loop.

    .venv/bin/python bench/shard.py [--images 1000] [--processes 2] [--threads 16] [--repeat 5] [--skip-img2dataset]

All three contenders get the same photo-like JPEGs (1024x768, 100-240 KB at q90, made once into bench/_work/),
resize them to 256 on the shorter side (keep_ratio, bicubic-class filter) and re-encode them as JPEG q90, with the
same number of processes (and threads, where a contender has them):

- mmfuse: ``python -m data_pipeline shard`` (the CLI) on a parquet manifest of local paths;
- img2dataset: its own venv (bench/_work/venv-img2dataset, installed on first use), the same rows as file:// URLs
  (its urllib fetcher opens nothing else), webdataset output, its defaults otherwise (sha256, EXIF extraction);
- floor: a bare ``multiprocessing.Pool`` loop that only reads, decodes, resizes and encodes; its method is picked
  by a calibration run as the fastest of Pillow (draft mode) and simplejpeg (scaled decode) decoders and encoders.

Each contender runs as a child process with the same environment, the contenders interleaved round by round. Wall
time covers the whole command (interpreter start, imports, worker start-up, writing); CPU time is the user+system
time of the whole process tree (``getrusage(RUSAGE_CHILDREN)``), which other users of a shared machine disturb
much less than wall time. Each round also runs every contender on 2 photos per process: that is its start-up cost,
and CPU time minus it gives the steady rate a long run approaches. Peak RSS per worker is the kernel's high-water
mark (VmHWM) of the N busiest processes of the tree. Results: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import simplejpeg
from PIL import Image, ImageDraw, ImageFilter

BENCH = Path(__file__).resolve().parent
WORK = BENCH / "_work"
IMAGES = WORK / "photos-v1-1024x768"
I2D_VENV = WORK / "venv-img2dataset"
SIZE, QUALITY = 256, 90
WIDTH, HEIGHT = 1024, 768
# glibc's allocator settings from DESIGN.md ("Facts verified"); --malloc-env gives them to every contender alike.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "67108864", "MALLOC_TRIM_THRESHOLD_": "134217728"}
SUBJECTS = ["a hillside", "a harbour", "a market stall", "an old door", "a forest path", "a city street", "a field"]
LIGHTS = ["at dusk", "in the morning", "under clouds", "in the rain", "at noon", "in winter", "in autumn"]


# ---------------------------------------------------------------------------------------------------- input data

def photo_jpeg(index: int) -> bytes:
    """A deterministic photo-like picture: a smooth colour field, two scales of texture, a few hard-edged objects,
    a lens blur and sensor grain. At q90 it compresses like a photo (100-240 KB), unlike flat synthetic shapes."""
    rng = np.random.default_rng([20240611, index])
    coarse = rng.uniform(40, 200) + rng.normal(0, 20, 3) + rng.normal(0, 35, (4, 5, 3))
    image = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8)).resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32)
    detail = rng.uniform(0.4, 1.6)
    for divisor, amplitude in ((16, 18), (4, 10)):
        texture = rng.normal(0, amplitude * detail, (HEIGHT // divisor, WIDTH // divisor)).astype(np.float32)
        pixels = pixels + np.asarray(Image.fromarray(texture, mode="F").resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC))[..., None]
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(3, 8)):
        x, y, r = rng.integers(0, WIDTH), rng.integers(0, HEIGHT), rng.integers(30, 200)
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x - r, y - r * 0.7, x + r, y + r * 0.7), fill=colour)
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(rng.uniform(0.8, 1.6))), dtype=np.float32)
    grain = rng.uniform(1.5, 5.0)
    pixels = pixels + rng.normal(0, grain, (HEIGHT, WIDTH, 1)) + rng.normal(0, grain / 2, (HEIGHT, WIDTH, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _write_photo(index: int) -> None:
    path = IMAGES / f"{index:06d}.jpg"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(photo_jpeg(index))
    tmp.rename(path)


def caption(index: int) -> str:
    return f"photo {index}: {SUBJECTS[index % len(SUBJECTS)]} {LIGHTS[index // len(SUBJECTS) % len(LIGHTS)]}"


def ensure_inputs(count: int, processes: int) -> tuple[list[Path], Path, Path]:
    """The first ``count`` photos (made once, cached), a manifest of paths for mmfuse and one of file:// URLs for
    img2dataset: same rows, same captions."""
    IMAGES.mkdir(parents=True, exist_ok=True)
    missing = [i for i in range(count) if not (IMAGES / f"{i:06d}.jpg").exists()]
    if missing:
        started = time.time()
        print(f"making {len(missing)} photo-like JPEGs in {IMAGES} (once) ...", flush=True)
        with Pool(processes) as pool:
            pool.map(_write_photo, missing, chunksize=8)
        print(f"  done in {time.time() - started:.0f} s", flush=True)
    paths = [IMAGES / f"{i:06d}.jpg" for i in range(count)]
    captions = [caption(i) for i in range(count)]
    mmfuse_manifest, i2d_manifest = WORK / f"manifest-{count}.parquet", WORK / f"manifest-{count}-urls.parquet"
    pq.write_table(pa.table({"image": [str(p) for p in paths], "text": captions}), mmfuse_manifest)
    pq.write_table(pa.table({"url": [p.as_uri() for p in paths], "caption": captions}), i2d_manifest)
    return paths, mmfuse_manifest, i2d_manifest


def ensure_img2dataset() -> Path:
    python = I2D_VENV / "bin" / "python"
    probe = [str(python), "-c", "import img2dataset"]
    if python.exists() and subprocess.run(probe, capture_output=True, env=_i2d_env()).returncode == 0:
        return python
    print(f"installing img2dataset into {I2D_VENV} (once) ...", flush=True)
    subprocess.run(["python3", "-m", "venv", "--clear", str(I2D_VENV)], check=True)
    # Pinned: the results and the quirks worked around here (DESIGN.md) are those of 1.47.
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "img2dataset==1.47.*"], check=True)
    return python


def _i2d_env() -> dict:
    return {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}


# --------------------------------------------------------------------------------------------------- the floor

def _target(width: int, height: int) -> tuple[int, int]:
    scale = SIZE / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _decode_pillow(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    width, height = image.size
    scale = SIZE / min(width, height)
    image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
    image.load()
    return image


def _decode_simplejpeg(data: bytes) -> Image.Image:
    height, width = simplejpeg.decode_jpeg_header(data)[:2]
    scale = SIZE / min(width, height)
    return Image.fromarray(simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=math.ceil(height * scale), min_width=math.ceil(width * scale)))


def _encode_pillow(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=QUALITY)
    return out.getvalue()


def _encode_simplejpeg(image: Image.Image) -> bytes:
    return simplejpeg.encode_jpeg(np.asarray(image), quality=QUALITY, colorspace="RGB", colorsubsampling="420")


DECODERS = {"pillow-draft": _decode_pillow, "simplejpeg": _decode_simplejpeg}
ENCODERS = {"pillow": _encode_pillow, "simplejpeg": _encode_simplejpeg}
FLOOR_METHODS = [f"{d}+{e}" for d in DECODERS for e in ENCODERS]


def bare(data: bytes, method: str) -> bytes:
    """decode → resize (bicubic, antialiased, as mmfuse) → encode, nothing else."""
    decoder, encoder = method.split("+")
    height, width = simplejpeg.decode_jpeg_header(data)[:2]
    image = DECODERS[decoder](data).resize(_target(width, height), Image.Resampling.BICUBIC)
    return ENCODERS[encoder](image)


def _floor_task(job: tuple[str, str]) -> tuple[int, int]:
    path, method = job
    with open(path, "rb") as f:
        out = bare(f.read(), method)
    return 1, len(out)


def floor_main(manifest: str, processes: int, method: str, result: str) -> None:
    """The floor contender's process: a Pool over the manifest's paths, results counted, nothing written."""
    # The same Pillow memory reuse that data_pipeline.image sets up, so the floor is not slowed by the allocator.
    Image.core.set_block_size(1 << 20)
    Image.core.set_blocks_max(32)
    paths = pq.read_table(manifest, columns=["image"]).column("image").to_pylist()
    with Pool(processes) as pool:
        done = list(pool.imap_unordered(_floor_task, [(p, method) for p in paths], chunksize=8))
    Path(result).write_text(json.dumps({"written": sum(n for n, _ in done), "jpg_bytes": sum(b for _, b in done)}))


def calibrate(paths: list[Path], rounds: int = 5, count: int = 100) -> dict[str, float]:
    """CPU ms per image of each floor method and of mmfuse's process_image, in this process (no pipeline)."""
    from data_pipeline.config import ImageConfig
    from data_pipeline.image import process_image

    datas = [p.read_bytes() for p in paths[:count]]
    cfg = ImageConfig(size=SIZE, resize_mode="keep_ratio", format="jpg", quality=QUALITY)
    candidates = {m: (lambda d, m=m: bare(d, m)) for m in FLOOR_METHODS}
    candidates["mmfuse process_image"] = lambda d: process_image(d, cfg)
    best = dict.fromkeys(candidates, math.inf)
    for _ in range(rounds):
        for name, fn in candidates.items():
            started = time.process_time()
            for data in datas:
                fn(data)
            best[name] = min(best[name], (time.process_time() - started) / len(datas) * 1e3)
    return best


# ------------------------------------------------------------------------------------------------ measurement

@dataclass
class Measured:
    wall: float
    cpu: float
    workers_rss_mb: list[float]


@dataclass
class Result:
    """One contender over all rounds: full runs, tiny runs (start-up cost), and what its last full run wrote."""

    name: str
    full: list[Measured] = field(default_factory=list)
    tiny: list[Measured] = field(default_factory=list)
    written: int = 0
    jpg_bytes: int = 0
    sizes: set = field(default_factory=set)


class TreeWatcher(threading.Thread):
    """Samples every process of a tree from /proc: its kernel high-water RSS (VmHWM) and CPU time, by pid."""

    def __init__(self, root: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.hwm_kb: dict[int, int] = {}
        self.cpu_ticks: dict[int, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for pid in self._tree():
                try:
                    with open(f"/proc/{pid}/status") as f:
                        hwm = next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0)
                    with open(f"/proc/{pid}/stat") as f:
                        fields = f.read().rpartition(")")[2].split()
                except OSError:  # it just exited
                    continue
                self.hwm_kb[pid] = max(self.hwm_kb.get(pid, 0), hwm)
                self.cpu_ticks[pid] = max(self.cpu_ticks.get(pid, 0), int(fields[11]) + int(fields[12]))  # utime + stime
            self.stop.wait(self.interval)

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        ppid = int(f.read().rpartition(")")[2].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                children.setdefault(ppid, []).append(int(entry))
        tree, todo = [], [self.root]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo.extend(children.get(pid, []))
        return tree

    def busiest_rss_mb(self, count: int) -> list[float]:
        busiest = sorted(self.cpu_ticks, key=self.cpu_ticks.get, reverse=True)[:count]
        return [self.hwm_kb[pid] / 1024 for pid in busiest]


def measure(name: str, command: list[str], env: dict, processes: int, log: Path) -> Measured:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=BENCH.parent)
        watcher = TreeWatcher(proc.pid)
        watcher.start()
        code = proc.wait()
    wall = time.perf_counter() - started
    watcher.stop.set()
    watcher.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code:
        sys.exit(f"{name} failed (exit {code}); its output: {log}\n{log.read_text()[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    # Processes that nobody waits for (multiprocessing's fork server and the workers it forks) never reach
    # RUSAGE_CHILDREN: take the CPU time sampled from /proc over the whole tree when that is larger.
    sampled = sum(watcher.cpu_ticks.values()) / os.sysconf("SC_CLK_TCK")
    return Measured(wall, max(cpu, sampled), watcher.busiest_rss_mb(processes))


def tar_summary(folder: Path) -> tuple[int, int, set]:
    """(jpg members, their bytes, the sizes of some of them) over the shards in ``folder``."""
    written, total, sizes = 0, 0, set()
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            for info in tar:
                if info.name.endswith(".jpg"):
                    written += 1
                    total += info.size
                    if written % 50 == 1:
                        sizes.add(Image.open(io.BytesIO(tar.extractfile(info).read())).size)
    return written, total, sizes


I2D_SCRIPT = """
import sys, img2dataset
manifest, out, processes, threads, per_shard = sys.argv[1:6]
img2dataset.download(
    url_list=manifest, input_format="parquet", url_col="url", caption_col="caption", output_folder=out,
    output_format="webdataset", image_size=256, resize_mode="keep_ratio", encode_format="jpg", encode_quality=90,
    processes_count=int(processes), thread_count=int(threads), number_sample_per_shard=int(per_shard),
    distributor="multiprocessing", enable_wandb=False, timeout=10, retries=0,
)
"""


@dataclass
class Inputs:
    paths_manifest: Path
    urls_manifest: Path
    per_shard: int


def run_once(name: str, args, inputs: Inputs, env: dict, floor_method: str, i2d_python: Path | None, tag: str) -> tuple[Measured, tuple]:
    """Run one contender on one input into a fresh output folder; returns the measurement and what it wrote."""
    out = WORK / "out" / f"{name}-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    if name == "mmfuse":
        command = [
            sys.executable, "-m", "data_pipeline", "shard",
            f"input.path={inputs.paths_manifest}", f"output.path={out}", f"output.samples_per_shard={inputs.per_shard}",
            f"processes={args.processes}", f"fetch.threads={args.threads}", "progress=false",
            f"image.size={SIZE}", "image.resize_mode=keep_ratio", "image.format=jpg", f"image.quality={QUALITY}",
        ]
    elif name == "img2dataset":  # a fresh folder each time: its "overwrite" mode would delete the inputs
        command = [str(i2d_python), "-c", I2D_SCRIPT, str(inputs.urls_manifest), str(out), str(args.processes), str(args.threads), str(inputs.per_shard)]
        env = {**env, "NO_ALBUMENTATIONS_UPDATE": "1"}
    else:
        out.mkdir(parents=True)
        command = [sys.executable, __file__, "--floor-worker", str(inputs.paths_manifest), str(args.processes), floor_method, str(out / "result.json")]
    measured = measure(name, command, env, args.processes, out.parent / f"{name}-{tag}.log")
    if name == "floor":
        summary = json.loads((out / "result.json").read_text())
        wrote = (summary["written"], summary["jpg_bytes"], {_target(WIDTH, HEIGHT)})
    else:
        wrote = tar_summary(out)
    shutil.rmtree(out)
    return measured, wrote


# ------------------------------------------------------------------------------------------------------ report

def table(results: list[Result], images: int, tiny_images: int, processes: int) -> str:
    cores = min(processes, os.cpu_count() or processes)
    header = ("contender", "samples/s", "per core", "per CPU-s", "start-up s (wall/CPU)", "steady per CPU-s",
              "peak RSS/worker MB", "written", "avg jpg KB")
    rows = [header]
    for r in results:
        wall, cpu = min(m.wall for m in r.full), min(m.cpu for m in r.full)
        tiny_wall, tiny_cpu = min(m.wall for m in r.tiny), min(m.cpu for m in r.tiny)
        rss = [max(values) for values in zip(*(m.workers_rss_mb for m in r.full))]
        rows.append((
            r.name, f"{images / wall:.0f}", f"{images / wall / cores:.0f}", f"{images / cpu:.0f}",
            f"{tiny_wall:.2f} / {tiny_cpu:.2f}", f"{(images - tiny_images) / (cpu - tiny_cpu):.0f}",
            " / ".join(f"{mb:.0f}" for mb in rss), str(r.written), f"{r.jpg_bytes / max(r.written, 1) / 1e3:.1f}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def ratios(results: list[Result], images: int, tiny_images: int) -> list[str]:
    by_name = {r.name.split(" ")[0]: r for r in results}

    def steady_cpu(r: Result) -> float:
        return min(m.cpu for m in r.full) - min(m.cpu for m in r.tiny)

    mine, lines = by_name["mmfuse"], []
    for other, target in (("img2dataset", 2.0), ("floor", 0.85)):
        if other in by_name:
            theirs = by_name[other]
            wall = min(m.wall for m in theirs.full) / min(m.wall for m in mine.full)
            cpu = min(m.cpu for m in theirs.full) / min(m.cpu for m in mine.full)
            steady = steady_cpu(theirs) / steady_cpu(mine)
            verdict = "meets" if wall >= target else "misses"
            lines.append(f"mmfuse / {other}: {wall:.2f}x samples/s per core ({verdict} the target >= {target}x); "
                         f"{cpu:.2f}x by CPU time; {steady:.2f}x by CPU time without start-up")
    return lines


def check_comparable(results: list[Result], images: int) -> list[str]:
    problems = []
    expected = _target(WIDTH, HEIGHT)
    sizes = [r.jpg_bytes / max(r.written, 1) for r in results]
    for r in results:
        if r.written != images:
            problems.append(f"{r.name} wrote {r.written} of {images} samples")
        if r.sizes != {expected}:
            problems.append(f"{r.name} output sizes {sorted(r.sizes)}, expected {expected}")
    if max(sizes) > 1.25 * min(sizes):
        problems.append(f"average output sizes differ by more than 25%: {[round(s) for s in sizes]}")
    return problems


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="photos to shard (default 1000)")
    parser.add_argument("--processes", type=int, default=2, help="worker processes of every contender (default 2)")
    parser.add_argument("--threads", type=int, default=16, help="threads per process, mmfuse and img2dataset (default 16)")
    parser.add_argument("--samples-per-shard", type=int, default=100, help="shard size, mmfuse and img2dataset (default 100)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds; each contender's best round is reported (default 5)")
    parser.add_argument("--skip-img2dataset", action="store_true", help="leave img2dataset out (no venv install)")
    parser.add_argument("--malloc-env", action="store_true", help=f"run every contender with {' '.join(f'{k}={v}' for k, v in MALLOC_ENV.items())}")
    parser.add_argument("--floor-worker", nargs=4, metavar=("MANIFEST", "PROCESSES", "METHOD", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.floor_worker:
        manifest, processes, method, result = args.floor_worker
        return floor_main(manifest, int(processes), method, result)

    started, load_before = time.time(), os.getloadavg()[0]
    (WORK / "out").mkdir(parents=True, exist_ok=True)
    paths, paths_manifest, urls_manifest = ensure_inputs(args.images, args.processes)
    full = Inputs(paths_manifest, urls_manifest, args.samples_per_shard)
    # Start-up cost: the same command on 2 photos per process, one shard per process.
    tiny_images = 2 * args.processes
    _, tiny_paths, tiny_urls = ensure_inputs(tiny_images, args.processes)
    tiny = Inputs(tiny_paths, tiny_urls, 2)
    i2d_python = None if args.skip_img2dataset else ensure_img2dataset()
    env = {**os.environ, **(MALLOC_ENV if args.malloc_env else {})}

    print("per-image CPU cost in one process, no pipeline (ms, best of 5 x 100 images):")
    calibration = calibrate(paths)
    for name, ms in calibration.items():
        print(f"  {name:28s} {ms:6.2f}")
    method = min(FLOOR_METHODS, key=calibration.get)

    names = ["mmfuse"] + ([] if args.skip_img2dataset else ["img2dataset"]) + ["floor"]
    results = {name: Result(f"floor ({method})" if name == "floor" else name) for name in names}
    for attempt in range(args.repeat):
        for name in names:  # interleaved, so a burst of load elsewhere hits every contender alike
            result = results[name]
            result.tiny.append(run_once(name, args, tiny, env, method, i2d_python, f"tiny-{attempt}")[0])
            measured, (result.written, result.jpg_bytes, result.sizes) = run_once(name, args, full, env, method, i2d_python, str(attempt))
            result.full.append(measured)
        print(f"round {attempt + 1}: " + ", ".join(f"{n} {args.images / results[n].full[-1].wall:.0f}/s" for n in names), flush=True)

    rows = list(results.values())
    print()
    print(f"{args.images} photos 1024x768 -> 256 keep_ratio, jpg q90; {args.processes} processes x {args.threads} threads; "
          f"best of {args.repeat}; {os.cpu_count()} cores ({platform.machine()}), load average {load_before:.1f} -> "
          f"{os.getloadavg()[0]:.1f}; env: {'MALLOC_* thresholds' if args.malloc_env else 'default allocator'}; {time.strftime('%Y-%m-%d')}")
    print(table(rows, args.images, tiny_images, args.processes))
    for line in ratios(rows, args.images, tiny_images):
        print(line)
    problems = check_comparable(rows, args.images)
    print("outputs comparable: " + ("yes (same sample count, all 341x256, average size within 25%)" if not problems else "; ".join(problems)))
    print(f"(bench took {time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
