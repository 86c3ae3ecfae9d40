"""Credentials in URLs (user:password@, signed query strings) never reach what a run writes or prints: its saved
config, checkpoints, metrics, results card, release, log lines and error messages."""

import functools
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.integration.pretraining import command

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
SECRETS = ("PASSWORD-SECRET", "SIGNATURE-SECRET", "TOKEN-SECRET")


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:
        pass


@pytest.fixture
def shard_server(shards):  # noqa: F811
    """The shards over HTTP (query strings and credentials ignored, as a signed-URL store would check them)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(shards)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def signed(host: str, path: str) -> str:
    return f"http://user:PASSWORD-SECRET@{host}/{path}?X-Amz-Signature=SIGNATURE-SECRET&token=TOKEN-SECRET"


def leaks(folder: Path, *texts: str) -> list[str]:
    """Every file under ``folder`` (bytes, so checkpoints count) and every text that holds a secret."""
    found = [str(path) for path in folder.rglob("*") if path.is_file() and any(s.encode() in path.read_bytes() for s in SECRETS)]
    return found + [text[-500:] for text in texts if any(s in text for s in SECRETS)]


def test_signed_shard_urls_are_redacted_in_every_output_of_a_run(shard_server, tmp_path):
    run = tmp_path / "run"
    train = signed(shard_server, "shard-{000000..000003}.tar")
    result = subprocess.run(command(train, run, "run.steps=2", "launch.nproc=1", "engine.zero_stage=0", "run.log_every=1"),
                            capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "checkpoints" / "step_000002" / "COMMITTED").is_file()  # it really trained on the signed URLs
    assert "shard-{000000..000003}.tar?<redacted>" in (run / "config.yaml").read_text()
    export = subprocess.run([sys.executable, "-m", "pretrain.export", str(run), f"output.path={tmp_path / 'release'}"],
                            capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    evaluation = subprocess.run([sys.executable, "-m", "mmfuse.cli", "eval", "--config", "configs/finetune/zeroshot.yaml",
                                 f"checkpoint={tmp_path / 'release'}", f"data.eval={train}", f"run.dir={tmp_path / 'zeroshot'}",
                                 "data.workers=1", "launch.nproc=1"], capture_output=True, text=True, timeout=300)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    assert "?<redacted>" in (tmp_path / "zeroshot" / "config.yaml").read_text()
    assert leaks(tmp_path, result.stdout, result.stderr, export.stdout, export.stderr, evaluation.stdout,
                 evaluation.stderr) == []


def test_a_signed_url_that_fails_is_named_without_its_secrets(shard_server, tmp_path):
    missing = signed(shard_server, "nothing-{000000..000001}.tar")
    result = subprocess.run([sys.executable, "-m", "mmfuse.cli", *command(missing, tmp_path / "run")[2:]],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "nothing-000000.tar?<redacted>" in result.stderr or "nothing-{000000..000001}.tar?<redacted>" in result.stderr, \
        result.stderr[-2000:]
    assert leaks(tmp_path, result.stdout, result.stderr) == []
