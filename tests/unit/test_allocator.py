"""mmfuse.allocator: a tensor freed and allocated again is served from memory already mapped (no new page faults)."""

import subprocess
import sys

import pytest

from mmfuse.allocator import keep_freed_memory

# Like a training step: allocates and writes tensors of 8-64 MiB (120 MiB in all), then frees them; twelve rounds.
# Prints the minor page faults of each round.
ROUNDS = """
import resource, sys, torch
from mmfuse.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory(1 << 30, 1 << 30)
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.empty(n << 20).fill_(1.0) for n in (4, 8, 2, 16)]
    del tensors
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""


def fault_rounds(mode: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, check=True, timeout=120)
    return [int(n) for n in out.stdout.split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_tensor_memory_is_reused_instead_of_faulted_in_again():
    pages = (120 << 20) // 4096
    default = fault_rounds("default")
    kept = fault_rounds("keep")
    # glibc's default maps most such tensors afresh every time: every round faults in most of its pages again.
    assert all(n > pages // 2 for n in default), default
    # Kept: the first rounds map the memory; once glibc's heap has settled (a few rounds) it is reused, bar the
    # odd round that a thread's allocation rearranges.
    assert kept[0] > pages // 2 and sum(kept[4:]) < sum(default[4:]) // 4, (kept, default)


@pytest.mark.parametrize("mmap_threshold, trim_threshold", [(0, 1 << 20), (1 << 20, 1 << 31)])
def test_thresholds_outside_what_glibc_takes_are_refused(mmap_threshold, trim_threshold):
    with pytest.raises(ValueError, match="threshold"):
        keep_freed_memory(mmap_threshold, trim_threshold)
