"""``mmfuse inspect``: a reproducible sample of a dataset as a contact sheet, an HTML page and summary plots, read
from only the shards it draws from."""

from __future__ import annotations

import json
import shutil
import tarfile
import time
from html.parser import HTMLParser
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import soundfile
from PIL import Image

from data_pipeline.config import InspectConfig
from data_pipeline.inspect import choose_shards, draw_indices, read_shard
from data_pipeline.inspect_page import safe_name
from mmfuse.cli import main as cli
from mmfuse.config import load_config
from tests.loaderdata import jpeg, sample, write_tar

pytestmark = pytest.mark.timeout(180)
PLOTS = ("caption_lengths.png", "image_sizes.png", "modalities.png", "shard_counts.png", "failures.png")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """24 synthetic samples (image, caption, audio) as raw files + manifest.parquet, and as 3 shards of 8."""
    root = tmp_path_factory.mktemp("inspect")
    assert cli(["synth", f"output.path={root}/raw", "num_samples=24", "seed=1"]) == 0
    assert cli(["shard", "--config", "configs/data/shapes.yaml", f"input.path={root}/raw/manifest.parquet",
                f"output.path={root}/shards", "output.samples_per_shard=8", "processes=1", "progress=false"]) == 0
    return root


def inspect(dataset, out: Path, *overrides: str) -> dict:
    assert cli(["inspect", str(dataset), f"output.path={out}", "progress=false", *overrides]) == 0
    return json.loads((out / "samples.json").read_text())


class _Sources(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.audio = [], []

    def handle_starttag(self, tag, attrs):
        src = dict(attrs).get("src")
        if tag == "img":
            self.images.append(src)
        elif tag == "audio":
            self.audio.append(src)


def page_sources(out: Path) -> _Sources:
    parser = _Sources()
    parser.feed((out / "index.html").read_text())
    return parser


def test_every_file_the_page_shows_exists_and_decodes(data, tmp_path):
    out = tmp_path / "out"
    summary = inspect(data / "shards", out, "num_samples=10", "seed=0")
    sources = page_sources(out)
    # contact sheet + 5 plots + per sample its image and its audio strip
    assert len(sources.images) == 1 + len(PLOTS) + 2 * 10 and len(sources.audio) == 10
    for src in sources.images:
        with Image.open(out / src) as image:
            image.load()
    for src in sources.audio:
        wave, rate = soundfile.read(out / src)
        assert rate == 16000 and len(wave) == 2 * 16000
    assert {f"plots/{name}" for name in PLOTS} <= set(sources.images)
    assert summary["layout"] == "mmfuse" and summary["total"] == 24 and len(summary["samples"]) == 10
    html = (out / "index.html").read_text()
    for item in summary["samples"]:
        assert item["image"] in sources.images and item["width"] == item["height"] == 128
        assert item["caption"] and item["caption"] in html and f"<code>{item['key']}</code>" in html


def test_the_same_seed_draws_the_same_samples_and_another_seed_others(data, tmp_path):
    first = inspect(data / "shards", tmp_path / "a", "num_samples=6", "seed=3")
    again = inspect(data / "shards", tmp_path / "b", "num_samples=6", "seed=3")
    other = inspect(data / "shards", tmp_path / "c", "num_samples=6", "seed=4")
    keys = [s["key"] for s in first["samples"]]
    assert keys == [s["key"] for s in again["samples"]] and len(set(keys)) == 6
    assert keys != [s["key"] for s in other["samples"]]
    assert (tmp_path / "a" / "contact_sheet.png").read_bytes() == (tmp_path / "b" / "contact_sheet.png").read_bytes()


def test_draws_are_uniform_distinct_and_within_the_counts():
    counts = [8, 0, 5, 8]
    drawn = draw_indices(counts, 21, seed=0)
    assert sorted(set(drawn)) == drawn == [(s, i) for s, n in enumerate(counts) for i in range(n)]  # all when few
    assert draw_indices([1000] * 1000, 48, seed=1) == draw_indices([1000] * 1000, 48, seed=1)
    assert choose_shards([0, 3, None, 0, 5], shards=0, seed=0) == [1, 2, 4]  # empty shards are never drawn from
    assert len(choose_shards([10] * 1000, shards=8, seed=0)) == 8


def test_only_the_drawn_shards_are_opened(data, tmp_path):
    """An index of 1,000 shards of which only the 4 drawn from exist: the rest are missing or garbage."""
    root = tmp_path / "big"
    root.mkdir()
    names = [f"shard-{i:06d}.tar" for i in range(1000)]
    (root / "sizes.json").write_text(json.dumps(dict.fromkeys(names, 8)))
    chosen = [names[i] for i in choose_shards([8] * 1000, shards=4, seed=5)]
    for i, name in enumerate(names):
        if name in chosen:
            shutil.copy(data / "shards" / "shard-000001.tar", root / name)
        elif i % 2:
            (root / name).write_bytes(b"not a tar" * 100)
    started = time.monotonic()
    summary = inspect(root, tmp_path / "out", "num_samples=12", "shards=4", "seed=5")
    assert time.monotonic() - started < 30  # seconds, not a read of 1,000 shards
    assert summary["opened"] == sorted(chosen) and summary["problems"] == [] and summary["shards"] == 1000
    assert {s["origin"].split(" ")[0] for s in summary["samples"]} <= set(chosen)
    assert all(s["image"] and not s["problems"] for s in summary["samples"])


def test_a_tar_is_read_only_up_to_its_last_drawn_sample(tmp_path):
    """The tar is cut inside its 6th sample: drawing from the first samples never reaches the cut."""
    path = tmp_path / "shard-000000.tar"
    write_tar(path, [sample(f"{i:09d}", i) for i in range(8)])
    with tarfile.open(path) as tar:
        cut = next(info.offset_data for info in tar if info.name == "000000005.jpg") + 100
    path.write_bytes(path.read_bytes()[:cut])
    cfg = load_config(InspectConfig, [], ["path=x", "output.path=y"])
    samples, problem = read_shard(str(path), [0, 3, 4], cfg)
    assert problem == "" and [s.key for s in samples] == ["000000000", "000000003", "000000004"]
    for s, i in zip(samples, [0, 3, 4]):
        assert s.image and s.caption == f"caption {s.key}" and s.meta == {"label": i % 5} and not s.problems
    samples, problem = read_shard(str(path), [3, 6], cfg)
    assert problem.startswith("truncated or corrupt tar") and samples[1].problems == ["truncated or corrupt tar"]


def test_a_drawn_shard_that_is_missing_is_reported_not_fatal(data, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(data / "shards", root)
    (root / "shard-000002.tar").unlink()
    summary = inspect(root, tmp_path / "out", "num_samples=24")
    assert summary["problems"] == ["shard-000002.tar: shard missing"]
    lost = [s for s in summary["samples"] if s["problems"] == ["shard missing"]]
    assert len(lost) == 8 and all(s["image"] is None for s in lost)
    assert "shard-000002.tar: shard missing" in (tmp_path / "out" / "index.html").read_text()


def test_failure_reasons_come_from_the_sharding_stats(data, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(data / "shards", root)
    summary = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**summary, "failed": {"file_not_found": 3, "http_404": 1}}))
    assert inspect(root, tmp_path / "a", "num_samples=2")["failures"] == {"file_not_found": 3, "http_404": 1}
    (root / "dataset.json").unlink()  # an unfinished run: the per-shard stats files, summed
    for name, failed in (("shard-000000", {"http_404": 2}), ("shard-000002", {"http_404": 1, "too_large": 4})):
        stats = json.loads((root / f"{name}_stats.json").read_text())
        (root / f"{name}_stats.json").write_text(json.dumps({**stats, "failed": failed}))
    assert inspect(root, tmp_path / "b", "num_samples=2")["failures"] == {"too_large": 4, "http_404": 3}
    assert "<td>too_large</td><td>4</td>" in (tmp_path / "b" / "index.html").read_text()


def test_an_img2dataset_folder_with_hostile_captions_and_keys(tmp_path):
    """img2dataset's layout (tars + _stats.json, no sizes.json); captions and keys come from the web."""
    root = tmp_path / "laion"
    root.mkdir()
    evil = "<script>alert('x')</script> & \"quoted\""
    for shard in range(2):
        items = [sample(f"{shard:05d}{i:04d}", shard * 10 + i) for i in range(5)]
        if shard == 1:
            items[2] = {"__key__": "../../escaped", "jpg": jpeg(7, size=40), "txt": evil.encode()}
        write_tar(root / f"{shard:05d}.tar", items)
        stats = {"count": 8, "successes": 5, "failed_to_download": 3,
                 "status_dict": {"success": 5, "HTTP Error 404": 2, "cost $5 <b>": 1}}
        (root / f"{shard:05d}_stats.json").write_text(json.dumps(stats))
    out = tmp_path / "out"
    summary = inspect(root, out, "num_samples=100", "shards=0")
    assert summary["layout"] == "img2dataset" and summary["total"] == 10 and len(summary["samples"]) == 10
    assert summary["failures"] == {"HTTP Error 404": 4, "cost $5 <b>": 2}
    html = (out / "index.html").read_text()
    assert "<script>alert" not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;quoted&quot;" in html
    assert "cost $5 <b>" not in html and "<td>cost $5 &lt;b&gt;</td><td>2</td>" in html
    hostile = next(s for s in summary["samples"] if s["key"] == "../../escaped")
    assert hostile["image"] == f"images/{safe_name(7, '../../escaped')}.jpg" == "images/007-escaped.jpg"
    written = [p.resolve() for p in tmp_path.rglob("*") if p.is_file()]
    assert all(p.is_relative_to(out.resolve()) or p.is_relative_to(root.resolve()) for p in written)
    for src in page_sources(out).images:
        assert (out / src).resolve().is_relative_to(out.resolve())
        Image.open(out / src).load()


def test_a_manifest_is_drawn_from_and_fetched(data, tmp_path):
    summary = inspect(data / "raw" / "manifest.parquet", tmp_path / "a", "num_samples=5", "seed=2")
    rows = pq.read_table(data / "raw" / "manifest.parquet").to_pylist()
    by_id = {row["id"]: row for row in rows}
    assert summary["layout"] == "manifest" and summary["total"] == 24 and summary["opened"] == []
    for item in summary["samples"]:
        assert item["caption"] == by_id[item["key"]]["text"] and item["image"] and item["audio"]
    assert "shard_counts.png" not in {Path(src).name for src in page_sources(tmp_path / "a").images}

    # img2dataset's input columns, a row whose image is gone: drawn, shown with its reason, counted in the plot
    csv = tmp_path / "pairs.csv"
    lines = ["url,caption"] + [f"{data}/raw/{row['image']},{row['text']}" for row in rows[:3]] + ["gone.jpg,a lost one"]
    csv.write_text("\n".join(lines) + "\n")
    summary = inspect(csv, tmp_path / "b", "manifest.image_column=url", "manifest.text_column=caption")
    assert len(summary["samples"]) == 4 and summary["failures"] == {"file_not_found": 1}
    lost = next(s for s in summary["samples"] if s["caption"] == "a lost one")
    assert lost["image"] is None and lost["problems"] == ["image: file_not_found"]


def test_a_dataset_on_s3_reads_as_the_same_dataset_locally(data, tmp_path, s3_server, s3fs_client):
    s3fs_client.put(str(data / "shards"), f"{s3_server['bucket']}/ds", recursive=True)
    remote = inspect(f"{s3_server['url']}/ds", tmp_path / "s3", "num_samples=7", "seed=9", "shards=2")
    local = inspect(data / "shards", tmp_path / "local", "num_samples=7", "seed=9", "shards=2")
    assert remote["layout"] == "mmfuse" and remote["dataset"] == f"{s3_server['url']}/ds"
    assert [s["key"] for s in remote["samples"]] == [s["key"] for s in local["samples"]]
    assert remote["opened"] == local["opened"] and len(remote["opened"]) == 2
    for src in page_sources(tmp_path / "s3").images:
        Image.open(tmp_path / "s3" / src).load()
    inspect_to_s3 = ["inspect", f"{s3_server['url']}/ds", f"output.path={s3_server['url']}/page", "progress=false"]
    assert cli(inspect_to_s3) == 0  # the page may go to an object store too
    uploaded = json.loads(s3fs_client.cat_file(f"{s3_server['bucket']}/page/samples.json"))
    assert s3fs_client.exists(f"{s3_server['bucket']}/page/index.html")
    assert all(s3fs_client.exists(f"{s3_server['bucket']}/page/{s['image']}") for s in uploaded["samples"])


def _empty_shards(root: Path) -> Path:
    root.mkdir()
    (root / "shard-000000.tar").write_bytes(b"")
    (root / "sizes.json").write_text(json.dumps({"shard-000000.tar": 0}))
    return root


def _empty_manifest(root: Path) -> Path:
    root.mkdir()
    (root / "m.csv").write_text("image,text\n")
    return root / "m.csv"


def _undecodable(root: Path) -> Path:
    root.mkdir()
    write_tar(root / "00000.tar", [{"__key__": f"{i:09d}", "jpg": b"not an image"} for i in range(3)])
    (root / "00000_stats.json").write_text(json.dumps({"successes": 3}))
    return root


@pytest.mark.parametrize("make, message", [
    (lambda root: root / "nowhere", "does not exist"),
    (_empty_shards, "holds no samples"),
    (_empty_manifest, "holds no rows"),
    (lambda root: root.mkdir() or root, "neither a .tar"),
    (_undecodable, "none of the 3 sample(s) drawn from"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, make, message):
    dataset = make(tmp_path / "ds")
    capsys.readouterr()
    assert cli(["inspect", str(dataset), f"output.path={tmp_path / 'out'}", "progress=false"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mmfuse inspect: error: path: ") and message in err
    assert not (tmp_path / "out" / "index.html").exists()


def test_a_bad_setting_is_a_config_error(tmp_path, capsys):
    assert cli(["inspect", str(tmp_path), f"output.path={tmp_path / 'out'}", "num_samples=0"]) == 2
    assert capsys.readouterr().err.strip() == "mmfuse inspect: config error: num_samples must be within 1..1000, got 0"


def test_file_names_from_keys_stay_in_their_folder():
    assert safe_name(3, "../../etc/passwd") == "003-etc_passwd"
    assert safe_name(0, "a b/c?d") == "000-a_b_c_d" and safe_name(12, "...") == "012-sample"
