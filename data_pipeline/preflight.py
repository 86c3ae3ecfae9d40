"""Checks a stage runs in the launching process before any rank, worker process or SLURM job starts: inputs exist
and are readable, outputs are writable, object-store credentials are present, datasets hold samples and carry the
modalities the run needs.

Each failure is one ``PreflightError`` line naming the config key and the path (URLs without credentials or signed
queries); the CLI prints it and exits 1. Nothing here imports torch: a bad path comes back in about a second.
"""

from __future__ import annotations

import json
import os
import posixpath
import tarfile
from urllib.parse import urlsplit

from data_pipeline.loader.sources import dataset_names, shard_listing
from mmfuse.storage import filesystem, is_local, join
from mmfuse.redact import redact, redact_text
from data_pipeline.loader.tarstream import RetryingFile, split_name

MODALITIES = ("image", "text", "audio")
MANIFEST_SUFFIXES = (".parquet", ".csv", ".tsv", ".jsonl", ".txt")
PEEK_SAMPLES = 32  # samples of a dataset's first shard read (headers only) to tell its modalities


class PreflightError(ValueError):
    """An input or output of a run that cannot work, found before the run started."""


def reason(err: BaseException) -> str:
    """The first line of an exception, URLs redacted (botocore and aiohttp put whole URLs in their messages)."""
    text = redact_text(str(err)).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def check_credentials(key: str, url: str) -> None:
    """An s3:// URL needs credentials somewhere in botocore's chain (variables, profile, instance role)."""
    if urlsplit(url).scheme not in ("s3", "s3a"):
        return
    import botocore.session

    if botocore.session.get_session().get_credentials() is None:
        raise PreflightError(f"{key}: {redact(url)} needs AWS credentials and none were found (set AWS_ACCESS_KEY_ID and "
                             "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, in the environment)")


def exists(key: str, url: str) -> bool:
    """Whether ``url`` exists; a store that refuses to answer (credentials, endpoint) is an error naming it."""
    fs, path = filesystem(url)
    try:
        return fs.exists(path)
    except Exception as err:  # botocore, aiohttp and OSError subclasses, by endpoint
        raise PreflightError(f"{key}: cannot read {redact(url)}: {reason(err)}") from None


def check_input(key: str, url: str) -> None:
    """A file or folder the run reads."""
    check_credentials(key, url)
    if not exists(key, url):
        raise PreflightError(f"{key}: {redact(url)!r} does not exist")


def check_output(key: str, url: str) -> None:
    """A folder or prefix the run writes: locally, the nearest existing parent must be a writable folder (nothing
    is created); on an object store, a probe object is written and deleted (a missing bucket or a read-only
    credential fails here, not at the first checkpoint)."""
    check_credentials(key, url)
    if is_local(url):
        path = os.path.abspath(filesystem(url)[1])
        parent = path
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise PreflightError(f"{key}: {url!r} cannot be created: {parent!r} is a file, not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise PreflightError(f"{key}: {url!r} is not writable ({parent!r} does not allow this user to write)")
        return
    fs, path = filesystem(url)
    probe = join(path, f".mmfuse-preflight-{os.getpid()}")
    try:
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except Exception as err:  # botocore, aiohttp and OSError subclasses, by endpoint
        raise PreflightError(f"{key}: cannot write to {redact(url)}: {reason(err)}") from None


def check_dataset(key: str, spec: str) -> list[tuple[str, int | None]]:
    """Every dataset of ``spec`` (``a::b``, as the loader reads it) lists shards that exist and hold samples;
    returns the shard URLs with their sizes.json counts (None: not listed). Local shards are checked one by one, an
    object store's first and last (a 10,000-shard prefix is listed by its sizes.json)."""
    try:
        names = dataset_names(spec)
    except ValueError:
        raise PreflightError(f"{key} is empty: name a dataset folder (with sizes.json), a brace pattern or a .tar") from None
    listing: list[tuple[str, int | None]] = []
    for name in names:
        check_credentials(key, name)
        if name.lower().endswith(MANIFEST_SUFFIXES):
            shards = posixpath.join(posixpath.dirname(redact(name).rstrip("/")) or ".", "shards")
            raise PreflightError(f"{key}: {redact(name)!r} is a manifest, not shards: shard it first with "
                                 f"`mmfuse shard input.path={redact(name)} output.path={shards}`, then set {key}={shards}")
        pattern = "{" in name or name.endswith(".tar")
        web = name.startswith(("http://", "https://"))  # a static server may 404 a folder URL it serves files under
        if not pattern and not web and not exists(key, name):
            raise PreflightError(f"{key}: {redact(name)!r} does not exist")
        try:
            shards = shard_listing(name)
        except (ValueError, OSError) as err:
            raise PreflightError(f"{key}: {reason(err) if isinstance(err, OSError) else redact_text(str(err))}") from None
        if not shards:
            raise PreflightError(f"{key}: {redact(name)!r} lists no shards (its sizes.json is empty)")
        probe = shards if is_local(name) else [shards[0], shards[-1]]
        missing = [url for url, _ in probe if not exists(key, url)]
        if missing:
            shown = ", ".join(repr(redact(url)) for url in missing[:3])
            raise PreflightError(f"{key}: {len(missing)} of the {len(probe)} shard(s) checked do not exist, e.g. {shown}")
        counts = [count for _, count in shards]
        if None not in counts and sum(counts) == 0:
            raise PreflightError(f"{key}: {redact(name)!r} holds no samples (every shard has 0 in sizes.json)")
        listing += shards
    return listing


def dataset_modalities(spec: str, members) -> set[str]:
    """The modalities present in the datasets of ``spec``: ``dataset.json``'s list where a dataset folder has one
    (``mmfuse shard`` writes it), else the tar members of the first samples of its first shard. ``members`` is the
    loader's ``MembersConfig`` (which member extensions hold which modality)."""
    found: set[str] = set()
    for name in dataset_names(spec):
        if "{" not in name and not name.endswith(".tar"):
            fs, root = filesystem(name)
            summary = posixpath.join(root, "dataset.json")
            if fs.exists(summary):
                found |= set(json.loads(fs.cat_file(summary)).get("modalities", []))
                continue
        shards = shard_listing(name)
        found |= peek_modalities(next((url for url, count in shards if count != 0), shards[0][0]), members)
    return found


def size_mismatch(key: str, spec: str, model_size: int, larger: float = 4.0, smaller: float = 2.0) -> list[str]:
    """One line per dataset of ``spec`` whose shards ``mmfuse shard`` wrote at an image size ``larger`` times the
    model's input or more, or ``smaller`` times below it (``dataset.json`` records it): larger costs decode and resize
    work on every sample of every epoch, smaller is upsampled into blur. At 2x larger the cost did not show (the
    shapes world's 128 px shards for the 64 px tiny flavor: no faster at 64 px, and its 64 px JPEG shards trained a
    worse image tower, docs/demo.md), so only 4x and more is worth a word. Datasets without that record
    (img2dataset, resize_mode=no) say nothing."""
    lines = []
    for name in dataset_names(spec):
        if "{" in name or name.endswith(".tar"):
            continue
        fs, root = filesystem(name)
        summary = posixpath.join(root, "dataset.json")
        if not fs.exists(summary):
            continue
        image = json.loads(fs.cat_file(summary)).get("config", {}).get("image", {})
        size = image.get("size")
        if not isinstance(size, int) or image.get("resize_mode") == "no" or not size:
            continue
        if size >= larger * model_size:
            lines.append(f"{key}: {redact(name)} holds images at {size} px and the model reads {model_size} px: every "
                         f"sample is decoded at {size} and resized each epoch, about {(size / model_size) ** 2:.0f}x the "
                         f"pixels it needs; reshard once with image.size={model_size} for a faster loader (image.format=png "
                         f"if fine detail matters at that size: JPEG at a few dozen pixels blurs it)")
        elif size * smaller <= model_size:
            lines.append(f"{key}: {redact(name)} holds images at {size} px and the model reads {model_size} px: they "
                         f"are upsampled {model_size / size:.1f}x (blurred); reshard from the originals with "
                         f"image.size={model_size} if they are larger")
    return lines


def peek_modalities(url: str, members, samples: int = PEEK_SAMPLES) -> set[str]:
    """Modalities among the first ``samples`` samples of one tar, from its member names (the json member is read
    for a caption stored as a field, LAION-CLAP's layout); no image or audio is read."""
    extensions = {modality: set(getattr(members, modality).split(";")) for modality in MODALITIES}
    found: set[str] = set()
    keys: set[str] = set()
    with RetryingFile(url) as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
        for info in tar:
            tar.members.clear()
            if not info.isfile():
                continue
            key, ext = split_name(info.name)
            keys.add(key)
            if len(keys) > samples:
                break
            found |= {modality for modality, exts in extensions.items() if ext in exts}
            if ext == members.json and "text" not in found:
                meta = json.loads(tar.extractfile(info).read() or b"{}")
                if isinstance(meta, dict) and meta.get(members.text_json_field):
                    found.add("text")
    return found
