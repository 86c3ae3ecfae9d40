"""COCO caption metrics through pycocoevalcap, the code behind the COCO caption leaderboard: BLEU-1..4, METEOR,
ROUGE-L and CIDEr (pycocoevalcap's CIDEr is CIDEr-D) on captions tokenised by its PTBTokenizer.

The numbers equal those of pycocoevalcap's own ``COCOEvalCap`` on the same predictions and references (tested).
SPICE is left out: its scorer downloads Stanford CoreNLP models on first use, which cannot happen offline.

Needs ``java`` on PATH: the tokenizer (Stanford CoreNLP 3.4.1) and METEOR 1.5 are Java programs. The tokenizer
writes a temporary file next to its jar, inside the installed pycocoevalcap package, so that folder must be
writable. CIDEr's document frequencies come from the references being scored, so CIDEr depends on the whole set,
not on each image alone: score the full evaluation set at once.
"""
from __future__ import annotations

import shutil
from typing import Any, Hashable

METRICS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]


def coco_results(predictions: dict[Hashable, str]) -> list[dict[str, Any]]:
    """The COCO caption results format, ``[{"image_id": id, "caption": text}]``, sorted by image id."""
    return [{"image_id": image_id, "caption": caption} for image_id, caption in sorted(predictions.items())]


def caption_scores(predictions: dict[Hashable, str], references: dict[Hashable, list[str]]) -> dict[str, float]:
    """Corpus-level scores (pycocoevalcap's scale: 0..1, CIDEr 0..10) of one predicted caption per image against
    that image's reference captions. Keys: ``METRICS``. Both dicts must cover the same image ids."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if predictions.keys() != references.keys():
        missing = [i for i in references if i not in predictions][:5]
        extra = [i for i in predictions if i not in references][:5]
        raise ValueError(f"predictions and references must have the same image ids; without a prediction: "
                         f"{missing}, without references: {extra} (first 5 of each)")
    if not references:
        raise ValueError("no images to score")
    empty = [i for i, refs in references.items() if not refs][:5]
    if empty:
        raise ValueError(f"images without reference captions: {empty} (first 5)")
    if shutil.which("java") is None:
        raise RuntimeError("caption metrics need java on PATH (pycocoevalcap's PTB tokenizer and METEOR run in Java)")

    # One tokenizer run (one JVM start) for references and predictions: it tokenises line by line, so this gives
    # the same tokens as COCOEvalCap's two runs.
    tokenized = PTBTokenizer().tokenize({
        **{("ref", i): [{"caption": c} for c in refs] for i, refs in references.items()},
        **{("pred", i): [{"caption": predictions[i]}] for i in references},
    })
    gts = {i: tokenized[("ref", i)] for i in references}
    res = {i: tokenized[("pred", i)] for i in references}

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor = Meteor()
    try:
        meteor_score, _ = meteor.compute_score(gts, res)
    finally:
        _close(meteor)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {**{f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}, "METEOR": float(meteor_score),
            "ROUGE-L": float(rouge), "CIDEr": float(cider)}


def _close(meteor: Any) -> None:
    # pycocoevalcap's Meteor starts its Java process in __init__ and stops it only in __del__, i.e. whenever the
    # object happens to be collected; stop it now. Its __del__ still runs later and is harmless on a dead process.
    process = meteor.meteor_p
    with meteor.lock:
        for stream in (process.stdin, process.stdout, process.stderr):
            stream.close()
        process.kill()
        process.wait()
