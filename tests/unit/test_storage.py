"""storage: credential-free URLs for logs and records, atomic commits, the S3 endpoint from the environment."""

from __future__ import annotations

import fsspec
import pytest

from mmfuse.storage import commit_file, filesystem, write_bytes

from mmfuse.redact import redact, redact_text


@pytest.mark.parametrize(
    "url, expected",
    [
        ("https://user:hunter2@example.com/a/b.jpg", "https://example.com/a/b.jpg"),
        ("https://user:hunter2@example.com:8443/b.jpg", "https://example.com:8443/b.jpg"),
        ("https://u:p%40ss@host/x.jpg", "https://host/x.jpg"),
        ("https://u:p@ss@host/x.jpg", "https://host/x.jpg"),  # an unescaped @ in the password
        ("https://bucket.s3.amazonaws.com/k.jpg?X-Amz-Signature=abc&X-Amz-Credential=AKIA", "https://bucket.s3.amazonaws.com/k.jpg?<redacted>"),
        ("https://host/x.jpg?sig=abc#frag", "https://host/x.jpg?<redacted>"),
        ("s3://bucket/prefix/shard-000000.tar", "s3://bucket/prefix/shard-000000.tar"),
        ("https://example.com/plain.jpg", "https://example.com/plain.jpg"),
        ("/local/path/with?question.jpg", "/local/path/with?question.jpg"),  # a path, not a URL: left alone
        ("relative/img.jpg", "relative/img.jpg"),
    ],
)
def test_redact(url, expected):
    assert redact(url) == expected


def test_redact_passes_non_strings_through():
    assert redact(None) is None


def test_redact_text_redacts_every_url_in_a_message():
    message = (
        "GET https://alice:s3cret@cdn.example.com/a.jpg?token=T0KEN failed; "
        "retried via 'http://bob:pw2@mirror.example.org/a.jpg?sig=SIG' and s3://bucket/key.jpg"
    )
    redacted = redact_text(message)
    for secret in ("s3cret", "T0KEN", "pw2", "SIG", "alice", "bob"):
        assert secret not in redacted
    assert "https://cdn.example.com/a.jpg?<redacted>" in redacted
    assert "'http://mirror.example.org/a.jpg?<redacted>'" in redacted
    assert "s3://bucket/key.jpg" in redacted
    assert redact_text("no url here") == "no url here"


def test_commit_file_renames_locally(tmp_path):
    fs, root = filesystem(str(tmp_path))
    staged = tmp_path / ".shard-000000.tar.tmp-1"
    staged.write_bytes(b"new")
    target = tmp_path / "shard-000000.tar"
    target.write_bytes(b"old")
    commit_file(str(staged), fs, f"{root}/shard-000000.tar")
    assert target.read_bytes() == b"new"  # replaced whole
    assert not staged.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar"]


def test_commit_file_failure_keeps_the_staged_file_and_shows_nothing(tmp_path):
    fs, root = filesystem(str(tmp_path))
    staged = tmp_path / "staged"
    staged.write_bytes(b"data")
    with pytest.raises(FileNotFoundError):
        commit_file(str(staged), fs, f"{root}/missing-dir/shard.tar")
    assert staged.read_bytes() == b"data"  # left for the writer's abort() to remove
    assert not (tmp_path / "missing-dir").exists()


def test_commit_file_uploads_to_a_non_local_filesystem(tmp_path):
    """Through put_file, as on an object store (fsspec's in-memory filesystem is a real, non-local one)."""
    fs = fsspec.filesystem("memory")
    staged = tmp_path / "staged"
    staged.write_bytes(b"payload")
    commit_file(str(staged), fs, "/mmfuse-test-storage/shard-000000.tar", retries=0)
    try:
        assert fs.cat_file("/mmfuse-test-storage/shard-000000.tar") == b"payload"
        assert not staged.exists()  # the local copy goes once the upload is whole
    finally:
        fs.rm("/mmfuse-test-storage", recursive=True)


def test_write_bytes_is_atomic_locally(tmp_path):
    fs, root = filesystem(str(tmp_path))
    write_bytes(fs, f"{root}/sizes.json", b"{}")
    write_bytes(fs, f"{root}/sizes.json", b'{"a": 1}')
    assert (tmp_path / "sizes.json").read_bytes() == b'{"a": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["sizes.json"]  # no temp file left behind


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"])
def test_s3_endpoint_comes_from_the_environment(monkeypatch, variable):
    import s3fs

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv(variable, "http://127.0.0.1:9")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        fs, path = filesystem("s3://bucket/prefix")  # builds a client; nothing is contacted
        assert path == "bucket/prefix"
        assert fs.client_kwargs["endpoint_url"] == "http://127.0.0.1:9"
        assert fs.unstrip_protocol(path) == "s3://bucket/prefix"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_local_paths_get_the_local_filesystem(tmp_path):
    fs, path = filesystem(str(tmp_path / "out"))
    assert path == str(tmp_path / "out")
    assert "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def test_a_url_that_does_not_parse_is_still_redacted():
    from mmfuse.redact import redact_text

    text = redact_text("failed: http://user:PASS@[bad/x/y?sig=SECRET#frag, and https://h/p?token=T")
    assert "SECRET" not in text and "PASS" not in text and "token=T" not in text
    assert "http://[bad/x/y?<redacted>" in text
