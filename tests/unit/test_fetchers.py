"""Fetcher without a network: the X-Robots-Tag opt-out rule and the reasons of local and fsspec reads."""

from __future__ import annotations

import os
import uuid

import fsspec
import pytest

from data_pipeline.config import FetchConfig
from data_pipeline.errors import SampleError
from data_pipeline.shard.fetchers import Fetcher, opted_out


@pytest.mark.parametrize(
    "header, expected",
    [
        ("noai", True),
        ("noimageai", True),
        ("noindex", True),
        ("noimageindex", True),
        ("NoAI", True),
        ("nofollow, noai", True),
        ("  noarchive ,  noimageai ", True),
        ("noai noimageai", True),  # space-separated, seen in the wild
        ("nofollow", False),
        ("nofollow, noarchive, nosnippet", False),
        ("all", False),
        ("", False),
        # Scoped to a bot: applies to that bot only, up to the next bot name.
        ("otherbot: noai", False),
        ("otherbot: noindex, noai", False),
        ("mmfuse: noai", True),
        ("*: noindex", True),
        ("otherbot: nofollow, mmfuse: noimageai", True),
        ("noindex, otherbot: nofollow", True),
        ("mmfuse: nofollow, otherbot: noai", False),
        # Directives that carry a value after a colon are not bot names.
        ("unavailable_after: 25 Jun 2030 15:00:00 PST, noai", True),
        ("max-snippet: 20, max-image-preview: large, nofollow", False),
    ],
)
def test_opted_out(header, expected):
    assert opted_out(header) is expected


def test_opted_out_matches_the_configured_agent_token():
    assert opted_out("examplebot: noai", agent="examplebot")
    assert not opted_out("examplebot: noai", agent="mmfuse")
    assert Fetcher(FetchConfig(user_agent="ExampleBot/2.1 (+https://example.org)"))._agent == "examplebot"


def _reason(fetcher: Fetcher, location: str) -> str:
    with pytest.raises(SampleError) as failure:
        fetcher.fetch(location)
    return failure.value.reason


@pytest.fixture
def fetcher() -> Fetcher:
    return Fetcher(FetchConfig(max_bytes=100, retries=2, backoff=0.01))


def test_local_file_is_read_whole(tmp_path, fetcher):
    path = tmp_path / "a.jpg"
    path.write_bytes(b"x" * 100)  # exactly max_bytes is allowed
    assert fetcher.fetch(str(path)) == b"x" * 100
    assert fetcher.fetch(f"file://{path}") == b"x" * 100


def test_local_file_reasons(tmp_path, fetcher):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "big.jpg").write_bytes(b"x" * 101)
    assert _reason(fetcher, str(tmp_path / "missing.jpg")) == "file_not_found"
    assert _reason(fetcher, f"file://{tmp_path}/missing.jpg") == "file_not_found"
    assert _reason(fetcher, str(tmp_path / "empty.jpg")) == "empty_file"
    assert _reason(fetcher, str(tmp_path / "big.jpg")) == "too_large"
    assert _reason(fetcher, str(tmp_path)) == "not_a_file"  # a folder
    assert _reason(fetcher, str(tmp_path / "nul\0byte.jpg")) == "bad_path"
    assert _reason(fetcher, "http://[not-an-ipv6/a.jpg") == "read_error"


@pytest.mark.timeout(20)  # open() on a named pipe blocks until a writer comes: a hang here is the bug
def test_special_files_are_refused_without_opening(tmp_path, fetcher):
    os.mkfifo(tmp_path / "pipe.jpg")
    with pytest.raises(SampleError) as failure:
        fetcher.fetch(str(tmp_path / "pipe.jpg"))
    assert (failure.value.reason, failure.value.detail) == ("not_a_file", f"{tmp_path}/pipe.jpg: a named pipe")
    # /dev/zero would otherwise be read up to max_bytes and fail as too_large, /dev/null as empty_file.
    assert _reason(fetcher, "/dev/zero") == _reason(fetcher, "/dev/null") == "not_a_file"


def test_fsspec_reasons_are_not_retried_into_read_error(fetcher):
    """too_large and empty_file are properties of the object: reported as such at once, not as read_error."""
    fs = fsspec.filesystem("memory")
    root = f"/mmfuse-test-{uuid.uuid4().hex[:8]}"
    fs.pipe_file(f"{root}/ok.jpg", b"y" * 10)
    fs.pipe_file(f"{root}/big.jpg", b"y" * 101)
    fs.pipe_file(f"{root}/empty.jpg", b"")
    try:
        assert fetcher.fetch(f"memory://{root}/ok.jpg") == b"y" * 10
        assert _reason(fetcher, f"memory://{root}/big.jpg") == "too_large"
        assert _reason(fetcher, f"memory://{root}/empty.jpg") == "empty_file"
        assert _reason(fetcher, f"memory://{root}/missing.jpg") == "file_not_found"
    finally:
        fs.rm(root, recursive=True)
