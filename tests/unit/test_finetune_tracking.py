"""log.wandb=true: Weights & Biases as an optional extra. The same scalars as TensorBoard, the config redacted, an
offline run that writes its files (where wandb is installed), and a one-line error where it is not."""

import sys
import types

import pytest

from mmfuse.cli import main as cli
from mmfuse.config import CONFIG_ROOT
from mmfuse.tracking import LogConfig, MetricsLogger

SECRET_URL = "https://user:hunter2@data.example.com/train?X-Amz-Signature=abc123"


@pytest.mark.parametrize("stage, args", [
    ("finetune", ["--config", str(CONFIG_ROOT / "finetune" / "classify.yaml"), "checkpoint=/none", "data.eval=/none"]),
    ("pretrain", ["--config", str(CONFIG_ROOT / "pretrain" / "tiny.yaml"), "data.train=/none"]),
])
def test_wandb_enabled_but_not_installed_is_a_one_line_error(tmp_path, monkeypatch, capsys, stage, args):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an environment without the extra gives: ImportError
    assert cli([stage, *args, f"run.dir={tmp_path}/run", "log.wandb=true"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"mmfuse {stage}: config error: log.wandb=true needs wandb: pip install 'mmfuse[wandb]'"]


class _Recorder:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


def test_wandb_gets_the_tensorboard_scalars_and_a_redacted_config(tmp_path, monkeypatch):
    run, started = _Recorder(), []
    fake = types.ModuleType("wandb")
    fake.Settings = lambda **kwargs: kwargs
    fake.init = lambda **kwargs: started.append(kwargs) or run
    monkeypatch.setitem(sys.modules, "wandb", fake)
    logger = MetricsLogger(tmp_path, True, LogConfig(wandb=True, wandb_project="p"),
                           {"data": {"train": SECRET_URL}, "run": {"dir": str(tmp_path)}})
    logger._tb.close()
    logger._tb = tensorboard = _Recorder()
    logger.log(5, {"loss": 0.5, "lr": 1e-3, "train/samples": 80, "note": "text is not a scalar"})
    logger.close()
    (init,) = started
    assert init["project"] == "p" and init["dir"] == str(tmp_path) and init["name"] == tmp_path.name
    assert init["config"]["data"]["train"] == "https://data.example.com/train?<redacted>"
    assert init["settings"]["disable_git"] and init["settings"]["x_disable_meta"]  # no command line, no remote
    scalars = {args[0]: args[1] for name, args, _ in tensorboard.calls if name == "add_scalar"}
    assert run.calls[0] == ("log", (scalars,), {"step": 5})
    assert scalars == {"loss": 0.5, "lr": 1e-3, "train/samples": 80}
    assert run.calls[-1][0] == "finish"


def test_wandb_off_by_default_and_on_other_ranks(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # would fail if anything tried to start a run
    MetricsLogger(tmp_path, True, LogConfig()).close()
    MetricsLogger(tmp_path, False, LogConfig(wandb=True)).close()


def test_offline_wandb_run_writes_its_files(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = MetricsLogger(tmp_path, True, LogConfig(wandb=True), {"data": {"train": SECRET_URL}})
    for step in (1, 2):
        logger.log(step, {"loss": 1.0 / step})
    logger.close()
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    data = run_file.read_bytes()
    assert b"loss" in data and b"data.example.com/train?<redacted>" in data
    written = b"".join(p.read_bytes() for p in (tmp_path / "wandb").rglob("*") if p.is_file())
    assert b"hunter2" not in written and b"abc123" not in written
