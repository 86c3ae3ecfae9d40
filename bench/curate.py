"""mmfuse curate on the synthetic world made noisy: how well each filter finds what was planted, and how the
near-duplicate search scales.

    .venv/bin/python bench/curate.py --data DEMO/eval_shards --scorer DEMO/release     # make demo's folders
    .venv/bin/python bench/curate.py --data DEMO/shards --scale 1000000                # + the 1M-hash timing
    .venv/bin/python bench/curate.py --data POOL --scorer SCORER --semantic-clusters 100 --balance 300
    .venv/bin/python bench/curate.py --data POOL --scorer SCORER --train 2400 --eval HELD_OUT [--train-override ...]
    .venv/bin/python bench/curate.py --data POOL --semantic-scale 1000000              # SemDeDup on 1M x 512

Plants into a copy of ``--data``: ``--swap`` of the captions exchanged between samples, ``--exact`` byte-identical
copies and ``--near`` re-encoded (JPEG quality 60-90) and resized (75-90%) copies of random samples, each copy right
after a random later sample. Then runs ``mmfuse curate`` (without and, given ``--scorer``, with a model's scores) and
prints precision and recall per planted kind, the false removals among the originals, and the time. ``--scale N``
also times the near-duplicate search alone on N random 64-bit hashes with 1% planted near copies.
``--semantic-clusters K``: SemDeDup alone on the scorer's embeddings at three thresholds (copies found, originals
dropped). ``--balance T``: concept balancing with the world's class names as concepts. ``--train STEPS``: pre-trains
the same steps on the curated subset (the scorer's ``similarity.min`` plus the hash de-duplication), on the whole
noisy pool and on a random subset of the curated size, and prints each one's zero-shot accuracy on ``--eval``.
``--semantic-scale N``: SemDeDup alone on N random 512-d embeddings (1,000 clusters, 1% planted copies).
``--throughput``: scoring inside ``mmfuse curate`` (one process) against a bare decode-and-embed loop.
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
    captions = [flat[j]["txt"] for j in np.roll(chosen, 1)]  # read before any is written over
    for i, text in zip(chosen, captions):  # each chosen sample takes the previous chosen one's caption
        if text != flat[i]["txt"]:
            planted[flat[i]["__key__"]] = "swapped"
        flat[i] = {**flat[i], "txt": text}
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


def semantic(work: Path, planted: dict[str, str], scorer: str, clusters: int) -> None:
    """SemDeDup alone (the hash filters off) on the scorer's scans: the planted copies it finds, and what else it drops."""
    for threshold in (0.99, 0.97, 0.95):
        index, seconds = curate(work / "noisy", work / "scored", "captions.min_words=0", f"scorer={scorer}",
                                "dedup.exact=false", "dedup.near=false", f"semantic_dedup.clusters={clusters}",
                                f"semantic_dedup.threshold={threshold}")
        copies = {key for key, kind in planted.items() if kind in ("duplicate", "near_duplicate")}
        dropped = {row["key"] for row in index if row["reason"] == "semantic_duplicate"}
        originals = [row for row in index if row["key"] not in planted]
        others = sum(row["reason"] == "semantic_duplicate" for row in originals)
        print(f"[semantic_dedup.threshold={threshold}, clusters {clusters}, {seconds:.0f} s] copies planted "
              f"{len(copies)}, found {len(copies & dropped)} (recall {len(copies & dropped) / max(len(copies), 1):.3f}); "
              f"originals dropped {others} of {len(originals)} ({others / max(len(originals), 1):.1%})")


def balance(work: Path, cap: int) -> None:
    """Concept balancing with the world's 30 class names (singular and plural) as the concept list."""
    from collections import Counter

    from data_pipeline.synth import CLASSES, PLURALS

    concepts = work / "concepts.txt"
    concepts.write_text("".join(f"{name}\n{name.split()[0]} {PLURALS[name.split()[1]]}\n" for name in CLASSES))
    index, seconds = curate(work / "noisy", work / "plain", "captions.min_words=0", f"balance.concepts_file={concepts}",
                            f"balance.max_per_concept={cap}")
    matched = Counter(name for row in index if row["reason"] in ("", "concept_over_cap") for name in row["concepts"])
    kept = Counter(name for row in index if row["kept"] for name in row["concepts"])
    tail = {name for name, n in matched.items() if n <= cap}
    tail_rows = [row for row in index if row["reason"] in ("", "concept_over_cap") and row["concepts"]
                 and set(row["concepts"]) <= tail]
    print(f"[balance.max_per_concept={cap}, {seconds:.0f} s] concepts matched {len(matched)} (head {len(matched) - len(tail)}); "
          f"per concept matched {min(matched.values())}..{max(matched.values())} -> kept {min(kept.values())}.."
          f"{max(kept.values())}; tail-only samples kept {sum(row['kept'] for row in tail_rows)} of {len(tail_rows)}; "
          f"kept {sum(row['kept'] for row in index)} of {len(index)}")


def train(work: Path, curated: Path, eval_data: Path, steps: int, seed: int, overrides: list[str]) -> None:
    """Pre-trains the same steps on the curated subset, on the whole noisy pool and on a random subset of the curated
    size, and prints each one's zero-shot accuracy on the clean held-out shards."""
    import pyarrow as pa

    from data_pipeline.curate.scan import write_table

    index = pq.read_table(curated / "index.parquet")
    kept = np.asarray(index["kept"].to_pylist())
    random = np.zeros(len(kept), dtype=bool)
    random[np.random.default_rng(seed).choice(len(kept), int(kept.sum()), replace=False)] = True
    (work / "random").mkdir(exist_ok=True)
    write_table(str(work / "random" / "index.parquet"), index.select(["shard", "position", "key"]).append_column(
        "kept", pa.array(random)))
    for name, keep in (("curated", [f"data.keep={curated}"]), ("full pool", []),
                       ("random subset", [f"data.keep={work / 'random'}"])):
        run = work / f"run-{name.replace(' ', '-')}"
        started = time.perf_counter()
        assert cli(["pretrain", "--config", "configs/pretrain/tiny.yaml", f"data.train={work / 'noisy'}",
                    f"data.eval={eval_data}", f"run.dir={run}", f"run.steps={steps}", f"run.eval_every={steps}",
                    "run.eval_untrained=false", *overrides, *keep]) == 0
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        last = [row for row in rows if "eval/zeroshot/image/top1" in row][-1]
        samples = int(kept.sum()) if keep else len(kept)
        print(f"[train {name}: {samples} samples, {steps} steps, {time.perf_counter() - started:.0f} s] zero-shot image "
              f"top-1 {last['eval/zeroshot/image/top1']:.1f}%, audio {last.get('eval/zeroshot/audio/top1', float('nan')):.1f}%, "
              f"image->text R@1 {last.get('eval/retrieval/image_to_text/R@1', float('nan')):.1f}%")


def throughput(data: Path, scorer: str, work: Path, samples: int = 8192, batch: int = 64) -> None:
    """Scoring inside ``mmfuse curate`` (one process: read, hash, decode, embed, write the scan) against a bare loop
    over the same image-text samples (read, decode, embed), both loading the release and using torch's threads;
    the libraries are imported before either clock starts."""
    import open_clip
    import torch
    from PIL import Image

    import pretrain.scorer  # noqa: F401  (what the scan imports when it loads its scorer)
    from pretrain.release import load_release
    from tests.loaderdata import write_tar

    pairs = [{"__key__": r.key, "jpg": r.members["jpg"], "txt": r.members["txt"]}
             for t in sorted(data.glob("*.tar")) for r in iter_samples(str(t), {"jpg", "txt"}, 1 << 30)][:samples]
    plain = work / "image_text"
    plain.mkdir(parents=True, exist_ok=True)
    for i in range(0, len(pairs), 512):
        write_tar(plain / f"shard-{i // 512:06d}.tar", pairs[i:i + 512])
    (plain / "sizes.json").write_text(json.dumps({f"shard-{i // 512:06d}.tar": len(pairs[i:i + 512])
                                                  for i in range(0, len(pairs), 512)}))
    _, ours = curate(plain, work / "throughput", f"scorer={scorer}", "processes=1", "captions.min_words=0",
                     f"scorer_batch_size={batch}", "dedup.exact=false", "dedup.near=false", "sheet_samples=0")
    started = time.perf_counter()
    model, _ = load_release(scorer)
    model.eval()
    transform = open_clip.image_transform(model.cfg.image.image_size, is_train=False)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model.cfg.text.context_length)
    scores = []
    with torch.no_grad():
        for tar in sorted(plain.glob("*.tar")):
            rows = list(iter_samples(str(tar), {"jpg", "txt"}, 1 << 30))
            for i in range(0, len(rows), batch):
                chunk = rows[i:i + batch]
                images = torch.stack([transform(Image.open(io.BytesIO(r.members["jpg"])).convert("RGB")) for r in chunk])
                texts = tokenizer([r.members["txt"].decode() for r in chunk])
                scores.append((model.embed("image", images) * model.embed("text", texts)).sum(-1))
    bare = time.perf_counter() - started
    print(f"scoring throughput, {len(pairs)} image-text samples, one process: mmfuse curate {len(pairs) / ours:.0f} "
          f"samples/s, bare loop {len(pairs) / bare:.0f} samples/s ({bare / ours:.2f}x the bare loop)")


def semantic_scale(n: int, width: int = 512, clusters: int = 1000, seed: int = 0) -> None:
    """SemDeDup alone on ``n`` random unit vectors with 1% planted copies (cosine ~0.97 to their source)."""
    from data_pipeline.curate.filters import semantic_duplicates

    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, width), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    copies = rng.choice(n - 1, n // 100, replace=False)
    noise = rng.standard_normal((len(copies), width), dtype=np.float32)
    vectors[copies + 1] = vectors[copies] + 0.25 * noise / np.linalg.norm(noise, axis=1, keepdims=True)
    started = time.perf_counter()
    found = semantic_duplicates(vectors, np.ones(n, dtype=bool), np.zeros(n), clusters, 0.95, seed=seed)
    print(f"semantic dedup: {n:,} x {width} embeddings, {clusters:,} clusters: {time.perf_counter() - started:.1f} s, "
          f"{int((found >= 0).sum()):,} found ({len(copies):,} planted)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a sharded dataset of the synthetic world")
    parser.add_argument("--scorer", default="", help="a release to score image-text similarity with")
    parser.add_argument("--swap", type=float, default=0.4)
    parser.add_argument("--exact", type=float, default=0.1)
    parser.add_argument("--near", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=int, default=0, help="also time the near-duplicate search on N hashes")
    parser.add_argument("--semantic-clusters", type=int, default=0, help="with --scorer: SemDeDup with k clusters")
    parser.add_argument("--balance", type=int, default=0, help="concept balancing at this max_per_concept")
    parser.add_argument("--train", type=int, default=0,
                        help="with --scorer: pre-train this many steps on curated / full / random data")
    parser.add_argument("--eval", type=Path, default=None, help="clean held-out shards for --train's zero-shot")
    parser.add_argument("--train-override", nargs="*", default=[], help="--train's pretrain overrides")
    parser.add_argument("--train-min-similarity", type=float, default=0.5, help="--train's similarity.min")
    parser.add_argument("--semantic-scale", type=int, default=0, help="also time SemDeDup on N 512-d embeddings")
    parser.add_argument("--throughput", action="store_true", help="with --scorer: scoring against a bare loop")
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
            if args.semantic_clusters:
                semantic(work, planted, args.scorer, args.semantic_clusters)
        if args.balance:
            balance(work, args.balance)
        if args.train:
            index, _ = curate(work / "noisy", work / "scored", "captions.min_words=0", f"scorer={args.scorer}",
                              f"similarity.min={args.train_min_similarity}")
            print("curated for training: " + score(index, planted, "swapped", ("low_similarity",)))
            train(work, work / "scored", args.eval, args.train, args.seed, args.train_override)
        if args.throughput:
            throughput(args.data, args.scorer, work)
    if args.scale:
        scale(args.scale)
    if args.semantic_scale:
        semantic_scale(args.semantic_scale)
    return 0


if __name__ == "__main__":
    sys.exit(main())
