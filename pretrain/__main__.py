import sys

from mmfuse.launch import rank_entry
from pretrain.run import main

sys.exit(rank_entry("pretrain", main))
