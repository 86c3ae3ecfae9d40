"""``mmfuse <stage> [--config FILE.yaml]... [key=value]...``: one subcommand per stage, each a thin call into the
stage's own ``main(argv)``. Stages are imported only when chosen, so ``mmfuse shard`` never imports torch."""

from __future__ import annotations

import importlib
import sys

from mmfuse.config import ConfigError
from mmfuse.redact import redact_text

# name → (module with main(argv), one-line summary)
STAGES = {
    "synth": ("data_pipeline.synth", "generate the synthetic shapes world (images, captions, audio, task fields)"),
    "shard": ("data_pipeline.shard.stage", "pack raw pairs into WebDataset shards (local or s3://)"),
    "verify": ("data_pipeline.shard.verify", "check every shard of a dataset against sizes.json and its stats"),
    "curate": ("data_pipeline.curate.stage", "score, de-duplicate and filter shards into a subset index (data.keep=OUT)"),
    "inspect": ("data_pipeline.inspect", "sample a dataset: contact sheet, HTML page of samples, summary plots"),
    "pretrain": ("pretrain.run", "pre-train with contrastive + masked objectives under DeepSpeed ZeRO (launch.nproc=N)"),
    "export": ("pretrain.export", "consolidate a training checkpoint into a release folder (safetensors + open_clip export)"),
    "finetune": ("finetune.run", "fine-tune a release on zeroshot / retrieval / caption / vqa / classify, then evaluate"),
    "eval": ("finetune.eval", "evaluate a release on one task without training (metrics.json + RESULTS.md)"),
    "report": ("mmfuse.report", "compare runs side by side: config differences, overlaid curves, final metrics"),
    "submit": ("slurm.submit", "run any stage on SLURM (submitit): multi-node, job arrays, preemption -> requeue"),
}


def usage() -> str:
    width = max(map(len, STAGES))
    lines = ["usage: mmfuse <stage> [--config FILE.yaml]... [key=value]...   (mmfuse <stage> --help lists the keys)", "", "stages:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in STAGES.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"mmfuse: unknown stage {stage!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(STAGES[stage][0])
    try:
        result = module.main(rest)
    except ConfigError as err:
        print(f"mmfuse {stage}: config error: {redact_text(str(err))}", file=sys.stderr)
        return 2
    except ValueError as err:
        # Bad input the user can fix (a missing manifest column, an unreadable path): say what, no traceback.
        print(f"mmfuse {stage}: error: {redact_text(str(err))}", file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0


def console() -> int:
    """The ``mmfuse`` command: ``main`` in a process of its own, which exits right after."""
    from mmfuse.launch import skip_the_exit_collection

    try:
        return main()
    finally:
        skip_the_exit_collection()


if __name__ == "__main__":
    sys.exit(console())
