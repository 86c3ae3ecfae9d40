"""``python -m data_pipeline <synth|shard|verify> ...`` is ``mmfuse <stage> ...``."""

import sys

from mmfuse.cli import main

sys.exit(main())
