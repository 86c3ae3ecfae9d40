"""``mmfuse verify DATASET``: read every shard (local or object store) and check it against sizes.json and stats
(an img2dataset folder, which has no sizes.json: against each shard's ``_stats.json``).

Reports missing, truncated and corrupt shards, and counts that disagree; exits non-zero if anything is wrong.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from dataclasses import dataclass, field

from PIL import Image

from data_pipeline.config import VerifyConfig
from data_pipeline.loader.sources import stats_counts
from mmfuse.storage import filesystem, join
from mmfuse.redact import redact
from mmfuse.config import parse_args

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass
class Report:
    shards: int = 0
    samples: int = 0
    layout: str = "mmfuse"
    """``mmfuse`` (sizes.json, dataset.json) or ``img2dataset`` (tars and their _stats.json only)."""
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(cfg: VerifyConfig) -> Report:
    fs, root = filesystem(cfg.path)
    report = Report()
    if fs.exists(join(root, "sizes.json")):
        sizes: dict[str, int | None] = json.loads(fs.cat_file(join(root, "sizes.json")))
        if not fs.exists(join(root, "dataset.json")):
            report.problems.append("no dataset.json: the sharding run did not finish")
    else:  # img2dataset's output as it is: its tars, counted against their _stats.json
        try:
            sizes = stats_counts(fs, root)
        except ValueError as err:
            report.problems.append(str(err))
            return report
        if not sizes:
            report.problems.append(f"{redact(cfg.path)}: no sizes.json and no .tar files (sharding unfinished or not a dataset)")
            return report
        report.layout = "img2dataset"
    for name, expected in sorted(sizes.items()):
        report.shards += 1
        path = join(root, name)
        if not fs.exists(path):
            report.problems.append(f"{name}: missing")
            continue
        stats_path = join(root, name.removesuffix(".tar") + "_stats.json")
        if not fs.exists(stats_path):
            report.problems.append(f"{name}: no stats file")
        elif report.layout == "mmfuse" and json.loads(fs.cat_file(stats_path)).get("written") != expected:
            report.problems.append(f"{name}: stats and sizes.json disagree")
        try:
            found = _check_tar(fs, path, cfg.decode, report.problems, name)
        except (tarfile.TarError, EOFError, OSError) as err:
            report.problems.append(f"{name}: truncated or corrupt tar ({type(err).__name__}: {err})")
            continue
        report.samples += found
        if expected is not None and found != expected:
            said = "sizes.json says" if report.layout == "mmfuse" else "its stats say"
            report.problems.append(f"{name}: {found} samples, {said} {expected}")
    listed = set(sizes)
    for path in fs.glob(join(root, "*.tar")):
        if path.rsplit("/", 1)[-1] not in listed:
            report.problems.append(f"{path.rsplit('/', 1)[-1]}: not listed in sizes.json")
    return report


def _check_tar(fs, path: str, decode: bool, problems: list[str], name: str) -> int:
    keys: list[str] = []
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, _, ext = info.name.partition(".")
            if not keys or keys[-1] != key:
                keys.append(key)
            data = tar.extractfile(info).read()
            if len(data) != info.size:
                raise EOFError(f"member {info.name} is short")
            if decode:
                problem = _check_member(ext, data)
                if problem:
                    problems.append(f"{name}: {info.name}: {problem}")
    if len(set(keys)) != len(keys):
        problems.append(f"{name}: members of one sample are not adjacent or keys repeat")
    return len(set(keys))


def _check_member(ext: str, data: bytes) -> str | None:
    try:
        if ext in IMAGE_EXTENSIONS:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
        elif ext == "json":
            json.loads(data)
        elif ext == "txt":
            data.decode("utf-8")
        elif ext == "flac":
            import soundfile

            soundfile.read(io.BytesIO(data))
    except Exception as err:  # any decoder failure is a corrupt member
        return f"corrupt {ext} ({type(err).__name__})"
    return None


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(VerifyConfig, argv, prog="mmfuse verify", description=__doc__.split("\n\n")[0], positional="path")
    report = verify(cfg)
    for problem in report.problems:
        print(f"PROBLEM {problem}", file=sys.stderr)
    verdict = "OK" if report.ok else f"{len(report.problems)} problem(s)"
    layout = " (img2dataset layout)" if report.layout == "img2dataset" else ""
    print(f"{redact(cfg.path)}{layout}: {report.shards} shards, {report.samples} samples: {verdict}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
