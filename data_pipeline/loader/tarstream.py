"""Reading WebDataset tars sample by sample from any fsspec URL, with the guards a training loader needs.

- Members are grouped into samples by key (the name up to the first dot of its base name), as webdataset does.
- Only the configured extensions are read; anything else (``.pyd``, ``.pth``, ...) is never even loaded, let
  alone unpickled. A member larger than the limit is skipped from its header, unread.
- ``skip`` jumps over samples by walking headers and seeking, so resuming mid-shard costs no decoding and, on
  object stores, no download of the skipped bytes.
- A transient read error mid-shard (object stores drop connections) reopens the file and seeks back to where it
  was, a bounded number of times. A truncated or corrupt tar ends the shard early with its reason.

webdataset's own ``tar_file_iterator`` reads every member's bytes, which rules out both the size guard and the
seek-based skip, hence this small reader.
"""

from __future__ import annotations

import io
import tarfile
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from mmfuse.storage import filesystem

from mmfuse.redact import redact


@dataclass
class RawSample:
    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    """Reasons members of this sample were not read (member_too_large)."""


class ShardError(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class RetryingFile(io.RawIOBase):
    """A read-only, seekable view of a remote file that reopens and seeks back after a transient error.

    ``block_size``: bytes an object store is asked for per read (None: fsspec's default, 50 MB on s3, a whole
    shard in one request); a reader that stops early (``mmfuse inspect``) asks for less so as not to download
    what it never reads."""

    def __init__(self, url: str, retries: int = 3, backoff: float = 0.2, block_size: int | None = None):
        self.url, self.retries, self.backoff, self.block_size = url, retries, backoff, block_size
        self.fs, self.path = filesystem(url)
        self.pos = 0
        self.retried = 0
        self._f = self._open()

    def _open(self):
        f = self.fs.open(self.path, "rb", **({"block_size": self.block_size} if self.block_size else {}))
        if self.pos:
            f.seek(self.pos)
        return f

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def size(self) -> int:
        return self._call(lambda f: f.size)

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = self._call(lambda f: f.seek(offset, whence))
        return self.pos

    def read(self, size: int = -1) -> bytes:
        data = self._call(lambda f: f.read(size))
        self.pos += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def _call(self, op):
        for attempt in range(self.retries + 1):
            try:
                return op(self._f)
            except FileNotFoundError:
                raise
            except Exception:  # connection resets and timeouts come in many types (aiohttp, botocore, OSError)
                if attempt == self.retries:
                    raise
                self.retried += 1
                time.sleep(self.backoff * 2**attempt)
                try:
                    self._f.close()
                except Exception:  # the broken connection may fail to close; it is dropped either way
                    pass
                self._f = self._open()
        raise AssertionError("unreachable")

    def close(self) -> None:
        try:
            self._f.close()
        finally:
            super().close()


def split_name(name: str) -> tuple[str, str]:
    """``dir/000001.seg.jpg`` → (``dir/000001``, ``seg.jpg``): the key ends at the first dot of the base name."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def iter_samples(url: str, wanted: set[str] | None, max_member_bytes: int, skip: int = 0, retries: int = 3,
                 positions: Sequence[int] | None = None) -> Iterator[RawSample]:
    """Samples of one tar, in order, after skipping the first ``skip``; raises ShardError when the tar is bad.
    ``wanted``: the member extensions read (None: every member).
    ``positions`` (ascending): only the samples at these indices (a curated subset), ending after the last one;
    the others are passed over by their headers, their data never read."""
    take = None if positions is None else set(positions)
    last = None if positions is None else (positions[-1] if positions else -1)
    try:
        handle = RetryingFile(url, retries)
    except FileNotFoundError:
        raise ShardError("shard_missing", redact(url)) from None
    except Exception as err:
        raise ShardError("shard_unreadable", f"{redact(url)}: {type(err).__name__}") from None
    current: RawSample | None = None
    index = -1
    try:
        with tarfile.open(fileobj=handle, mode="r:") as tar:
            while True:
                try:
                    info = tar.next()
                except (tarfile.TarError, EOFError, OSError) as err:
                    raise ShardError("shard_truncated", f"{redact(url)}: {type(err).__name__}: {err}") from None
                if info is None:
                    break
                tar.members.clear()  # tarfile keeps every header otherwise
                if not info.isfile():
                    continue
                key, ext = split_name(info.name)
                if current is None or key != current.key:
                    if current is not None and index >= skip and (take is None or index in take):
                        yield current
                    index += 1
                    if last is not None and index > last:
                        return
                    current = RawSample(key)
                if index < skip or (take is not None and index not in take) or (wanted is not None and ext not in wanted):
                    continue
                if info.size > max_member_bytes:
                    current.skipped.append("member_too_large")
                    continue
                try:
                    data = tar.extractfile(info).read()
                except (tarfile.TarError, EOFError, OSError) as err:
                    raise ShardError("shard_truncated", f"{redact(url)}: {type(err).__name__}") from None
                if len(data) != info.size:
                    raise ShardError("shard_truncated", f"{redact(url)}: member {info.name} is cut short")
                current.members[ext] = data
            # tarfile takes a missing end-of-archive marker (two zero blocks) for the end: check it is there.
            if handle.size() - tar.offset < 2 * tarfile.BLOCKSIZE:
                raise ShardError("shard_truncated", f"{redact(url)}: no end-of-archive marker")
            if current is not None and index >= skip and (take is None or index in take):
                yield current
    except tarfile.ReadError as err:
        raise ShardError("shard_corrupt", f"{redact(url)}: {err}") from None
    finally:
        handle.close()


def count_samples(url: str) -> int:
    """Samples in a tar, from its headers alone."""
    keys = 0
    last = None
    with RetryingFile(url) as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
        for info in tar:
            tar.members.clear()
            key, _ = split_name(info.name)
            if info.isfile() and key != last:
                keys, last = keys + 1, key
    return keys
