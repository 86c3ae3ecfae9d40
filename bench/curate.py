"""mmfuse curate on the synthetic world made noisy: how well each filter finds what was planted, and how the
near-duplicate search scales.

    .venv/bin/python bench/curate.py --data DEMO/eval_shards --scorer DEMO/release     # make demo's folders
    .venv/bin/python bench/curate.py --data DEMO/shards --scale 1000000                # + the 1M-hash timing

Plants into a copy of ``--data``: ``--swap`` of the captions exchanged between samples, ``--exact`` byte-identical
copies and ``--near`` re-encoded (JPEG quality 60-90) and resized (75-90%) copies of random samples, each copy right
after a random later sample. Then runs ``mmfuse curate`` (without and, given ``--scorer``, with a model's scores) and
prints precision and recall per planted kind, the false removals among the originals, and the time. ``--scale N``
also times the near-duplicate search alone on N random 64-bit hashes with 1% planted near copies.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.curate.filters import near_duplicates  # noqa: E402
from data_pipeline.loader.tarstream import iter_samples  # noqa: E402
from mmfuse.cli import main as cli  # noqa: E402


def reencode(jpg: bytes, rng: np.random.Generator) -> bytes:
    from PIL import Image

    image = Image.open(io.BytesIO(jpg)).convert("RGB")
    scale = rng.uniform(0.75, 0.9)
    image = image.resize((max(8, round(image.width * scale)), max(8, round(image.height * scale))), Image.BICUBIC)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=int(rng.integers(60, 91)))
    return out.getvalue()


def make_noisy(data: Path, out: Path, swap: float, exact: float, near: float, seed: int) -> dict[str, str]:
    """Writes the noisy copy of ``data`` into ``out``; returns {key: planted kind} (swapped, duplicate, near_duplicate)."""
    from tests.loaderdata import write_tar

    rng = np.random.default_rng(seed)
    tars = sorted(data.glob("*.tar"))
    shards = [[{"__key__": r.key, **r.members} for r in iter_samples(str(t), {"jpg", "png", "txt", "json", "flac"}, 1 << 30)]
              for t in tars]
    flat = [sample for shard in shards for sample in shard]
    planted: dict[str, str] = {}
    chosen = rng.choice(len(flat), int(swap * len(flat)), replace=False)
    for i, j in zip(chosen, np.roll(chosen, 1)):  # each chosen sample takes the next chosen one's caption
        if flat[j]["txt"] != flat[i]["txt"]:
            planted[flat[i]["__key__"]] = "swapped"
        flat[i] = {**flat[i], "txt": flat[j]["txt"]}
    copies: dict[int, list[dict]] = {}
    for kind, share in (("duplicate", exact), ("near_duplicate", near)):
        for n, source in enumerate(rng.choice(len(flat), int(share * len(flat)), replace=False)):
            if flat[source]["__key__"] in planted:
                continue
            jpg = flat[source].get("jpg")
            if jpg is None:
                continue
            key = f"{kind[:4]}{n:06d}"
            after = int(rng.integers(source, len(flat)))  # later in dataset order than its original
            copies.setdefault(after, []).append({**flat[source], "__key__": key,
                                                 "jpg": jpg if kind == "duplicate" else reencode(jpg, rng)})
            planted[key] = kind
    sizes, position = {}, 0
    out.mkdir(parents=True, exist_ok=True)
    for tar, shard in zip(tars, shards):
        rows = []
        for i in range(position, position + len(shard)):
            rows += [flat[i], *copies.get(i, [])]
        position += len(shard)
        write_tar(out / tar.name, rows)
        sizes[tar.name] = len(rows)
    (out / "sizes.json").write_text(json.dumps(sizes))
    return planted


def score(index: list[dict], planted: dict[str, str], kind: str, reasons: tuple[str, ...]) -> str:
    truth = {key for key, k in planted.items() if k == kind}
    dropped = {row["key"] for row in index if row["reason"] in reasons}
    hit = len(truth & dropped)
    return (f"{kind}: planted {len(truth)}, dropped for {'/'.join(reasons)} {len(dropped)}, "
            f"precision {hit / max(len(dropped), 1):.3f}, recall {hit / max(len(truth), 1):.3f}")


def curate(dataset: Path, out: Path, *overrides: str) -> tuple[list[dict], float]:
    started = time.perf_counter()
    assert cli(["curate", f"input.path={dataset}", f"output.path={out}", "progress=false", *overrides]) == 0
    return pq.read_table(out / "index.parquet").to_pylist(), time.perf_counter() - started


def scale(n: int, max_distance: int = 4, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2)
    copies = rng.choice(n, n // 100, replace=False)
    flips = rng.integers(0, 64, (len(copies), max_distance))
    for c, bits in zip(copies, flips):
        h = int(hashes[c])
        for b in bits:
            h ^= 1 << int(b)
        hashes[(c + 1) % n] = h
    started = time.perf_counter()
    found = near_duplicates(hashes, np.ones(n, dtype=bool), max_distance)
    print(f"near-duplicate search: {n:,} hashes, max_distance {max_distance}: {time.perf_counter() - started:.1f} s, "
          f"{int((found >= 0).sum()):,} found ({len(copies):,} planted within {max_distance} bits)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a sharded dataset of the synthetic world")
    parser.add_argument("--scorer", default="", help="a release to score image-text similarity with")
    parser.add_argument("--swap", type=float, default=0.4)
    parser.add_argument("--exact", type=float, default=0.1)
    parser.add_argument("--near", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=int, default=0, help="also time the near-duplicate search on N hashes")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mmfuse-bench-curate-") as tmp:
        work = args.work or Path(tmp)
        planted = make_noisy(args.data, work / "noisy", args.swap, args.exact, args.near, args.seed)
        index, seconds = curate(work / "noisy", work / "plain", "captions.min_words=0")
        originals = [row for row in index if row["key"] not in planted]
        print(f"{len(index)} samples ({len(originals)} originals), scanned and filtered in {seconds:.1f} s")
        print(score(index, planted, "duplicate", ("duplicate",)))
        print(score(index, planted, "near_duplicate", ("near_duplicate",)))
        print(f"false removals among the originals: {sum(not row['kept'] for row in originals)} of {len(originals)}")
        if args.scorer:
            share = sum(kind == "swapped" for kind in planted.values()) / len(index)  # of all samples, copies included
            for rule in (f"similarity.top_fraction={1 - share:.2f}", "similarity.min=0.5", "similarity.min=0.7"):
                # One output folder: the first rule scans (and scores) the shards, the others re-decide from the scans.
                index, seconds = curate(work / "noisy", work / "scored", "captions.min_words=0",
                                        f"scorer={args.scorer}", rule)
                print(f"[{rule}, {seconds:.0f} s] " + score(index, planted, "swapped", ("low_similarity",)))
    if args.scale:
        scale(args.scale)
    return 0


if __name__ == "__main__":
    sys.exit(main())
