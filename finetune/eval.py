"""``mmfuse eval --config configs/finetune/<task>.yaml checkpoint=RELEASE data.eval=... run.dir=RUN``: evaluate only."""

from __future__ import annotations

import sys

from finetune.run import main as run_main


def main(argv: list[str] | None = None) -> int:
    return run_main(argv, stage="eval")


if __name__ == "__main__":
    from mmfuse.launch import rank_entry

    sys.exit(rank_entry("eval", main))
