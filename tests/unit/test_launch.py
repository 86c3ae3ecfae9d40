"""mmfuse/launch.py's process entry: what a rank or the ``mmfuse`` command does on its way out."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)

PROBE = """
import gc, sys
from mmfuse.launch import rank_entry
def main():
    assert gc.get_freeze_count() == 0  # main itself runs with the collector as it was
    {body}
code = rank_entry("probe", main)
print(code, gc.get_freeze_count() > 0)
"""


@pytest.mark.parametrize("body, code", [("return 0", "0"), ("raise ValueError('bad input')", "1")])
def test_a_finished_rank_leaves_its_objects_out_of_the_exit_collection(body, code):
    """The interpreter's last cycle collection walked every object torch and friends made (about 3 s a rank);
    frozen ones are skipped, on the way out after success and after bad input alike."""
    done = subprocess.run([sys.executable, "-c", PROBE.format(body=body)], capture_output=True, text=True, timeout=50)
    assert done.stdout.split() == [code, "True"], done.stderr[-2000:]


def test_the_mmfuse_command_freezes_after_its_stage_and_not_before():
    probe = ("import gc, sys\nfrom mmfuse import cli\nsys.argv = ['mmfuse', '--help']\n"
             "before = gc.get_freeze_count()\ncode = cli.console()\nprint(code, before, gc.get_freeze_count() > 0)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=50)
    assert done.stdout.split()[-3:] == ["0", "0", "True"], done.stderr[-2000:]
