"""mmfuse/launch.py's process entry: what a rank or the ``mmfuse`` command does on its way out."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

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


RANK_MODULE = """
import os, sys
from pathlib import Path
import probe_warm  # what a real rank imports first (torch): loaded already when the rank was forked
from mmfuse.launch import rank_entry

def main():
    rank, out = os.environ["RANK"], Path(sys.argv[1])
    (out / f"rank{rank}").write_text(Path("/proc/self/comm").read_text().strip() + "|" + " ".join(sys.argv[2:]))
    if rank == "1" and "fail" in sys.argv:
        raise ValueError("bad input on rank 1")
    return 0

sys.exit(rank_entry("probe", main))
"""
LAUNCHER = """
import sys
from mmfuse import launch
if sys.argv[2] == "exec":
    launch.accelerator_devices = lambda: ["/dev/nvidia0"]  # what a GPU machine has: fresh interpreters
sys.exit(launch.spawn_local("probe_rank", [sys.argv[1], *sys.argv[3:]], 2, stage="probe", warm=["probe_warm"]))
"""


@pytest.mark.parametrize("how", ["fork", "exec"])
def test_ranks_are_forked_from_a_launcher_that_imported_their_modules_once(tmp_path, how):
    (tmp_path / "probe_warm.py").write_text("import os\nopen(__file__ + '.imports', 'a').write(f'{os.getpid()}\\n')\n")
    (tmp_path / "probe_rank.py").write_text(RANK_MODULE)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{REPO}"}
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run([sys.executable, "-c", LAUNCHER, str(out), how, "x=1"], capture_output=True, text=True,
                          timeout=50, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    imports = (tmp_path / "probe_warm.py.imports").read_text().split()
    assert len(imports) == (1 if how == "fork" else 2)  # once in the launcher, or once in each rank
    names = {path.name: path.read_text() for path in out.iterdir()}
    assert names["rank1"].endswith("|x=1 launch.nproc=0")
    if how == "fork":
        assert names == {f"rank{r}": f"mmfuse rank {r}|x=1 launch.nproc=0" for r in (0, 1)}

    failed = subprocess.run([sys.executable, "-c", LAUNCHER, str(out), how, "fail"], capture_output=True, text=True,
                            timeout=50, env=env, cwd=tmp_path)
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines()[-1] == "mmfuse probe: error: [rank 1] bad input on rank 1"


def test_a_forked_rank_runs_a_module_its_launcher_imported_without_a_warning_per_rank(tmp_path):
    """The mmfuse command imports a stage's module (finetune.run) to read its config, then forks the ranks, which
    run it as __main__: runpy's 'found in sys.modules' warning, once per rank, is noise."""
    package = tmp_path / "probepkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "rank.py").write_text("import os, pathlib\nif __name__ == '__main__':\n"
                                     "    pathlib.Path('ran' + os.environ['RANK']).touch()\n")
    launcher = ("import sys, probepkg.rank\nfrom mmfuse import launch\n"
                "sys.exit(launch.spawn_local('probepkg.rank', [], 2, stage='probe', warm=['json']))")  # forked ranks
    done = subprocess.run([sys.executable, "-W", "default", "-c", launcher], capture_output=True, text=True, timeout=50,
                          env={**os.environ, "PYTHONPATH": f"{tmp_path}:{REPO}"}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "ran0").exists() and (tmp_path / "ran1").exists()  # (their stderr lines may interleave)
    assert "found in sys.modules" not in done.stderr
