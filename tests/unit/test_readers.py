import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.config import InputConfig
from data_pipeline.shard.readers import _cached_rows, list_sources, plan_shards, read_rows

ROWS = [{"image": f"img/{i}.jpg", "text": f"caption {i}", "label": i} for i in range(7)]


@pytest.fixture(autouse=True)
def fresh_cache():
    _cached_rows.cache_clear()
    yield
    _cached_rows.cache_clear()


def write_manifest(path, fmt, rows=ROWS):
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt in ("csv", "tsv"):
        sep = "\t" if fmt == "tsv" else ","
        lines = [sep.join(rows[0])] + [sep.join(str(v) for v in r.values()) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    elif fmt == "jsonl.gz":
        with gzip.open(path, "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl.gz"])
def test_manifest_formats_give_same_rows(tmp_path, fmt):
    path = write_manifest(tmp_path / f"m.{fmt}", fmt)
    tasks = plan_shards(InputConfig(path=str(path)), samples_per_shard=3, dedup=True)
    assert [(t.row_start, t.row_end) for t in tasks] == [(0, 3), (3, 6), (6, 7)]
    rows = [r for t in tasks for r in read_rows(t, InputConfig(path=str(path)))]
    assert [r.text for r in rows] == [f"caption {i}" for i in range(7)]
    # Relative paths resolve against the manifest's folder; other columns pass through.
    assert rows[2].image == f"{tmp_path}/img/2.jpg"
    assert rows[2].extra == {"label": 2}


def test_numeric_looking_captions_stay_strings(tmp_path):
    path = write_manifest(tmp_path / "m.csv", "csv", [{"image": "1.jpg", "text": "2024"}])
    rows = read_rows(plan_shards(InputConfig(path=str(path)), 10, False)[0], InputConfig(path=str(path)))
    assert rows[0].text == "2024"


def test_img2dataset_column_names(tmp_path):
    path = write_manifest(tmp_path / "m.parquet", "parquet", [{"url": "http://x/a.jpg", "caption": "hi"}])
    cfg = InputConfig(path=str(path), image_column="url", text_column="caption")
    rows = read_rows(plan_shards(cfg, 10, False)[0], cfg)
    assert (rows[0].image, rows[0].text) == ("http://x/a.jpg", "hi")


def test_missing_columns_error_names_them(tmp_path):
    path = write_manifest(tmp_path / "m.parquet", "parquet", [{"foo": 1}])
    with pytest.raises(ValueError, match="image_column"):
        plan_shards(InputConfig(path=str(path)), 10, False)


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl.gz"])
def test_missing_text_column_lists_the_columns_it_has(tmp_path, fmt):
    path = write_manifest(tmp_path / f"m.{fmt}", fmt, [{"url": "a.jpg", "caption": "a cat"}])
    with pytest.raises(ValueError) as err:
        plan_shards(InputConfig(path=str(path), image_column="url"), 10, False)
    assert "no text column 'text'" in str(err.value) and "['url', 'caption']" in str(err.value)
    _cached_rows.cache_clear()
    rows = read_rows(plan_shards(InputConfig(path=str(path), image_column="url", text_column=""), 10, False)[0],
                     InputConfig(path=str(path), image_column="url", text_column=""))
    assert rows[0].text is None and rows[0].extra == {"caption": "a cat"}  # captionless on purpose: allowed


def test_glob_of_manifests_shards_each_file(tmp_path):
    write_manifest(tmp_path / "a.parquet", "parquet", ROWS[:5])
    write_manifest(tmp_path / "b.parquet", "parquet", ROWS[5:])
    tasks = plan_shards(InputConfig(path=str(tmp_path / "*.parquet")), 4, False)
    assert [(t.shard_id, t.source.rsplit("/", 1)[-1], t.row_start, t.row_end) for t in tasks] == [
        (0, "a.parquet", 0, 4), (1, "a.parquet", 4, 5), (2, "b.parquet", 0, 2)]


def test_duplicate_rows_marked_across_shards(tmp_path):
    rows = ROWS[:4] + [ROWS[1], ROWS[3]]
    path = write_manifest(tmp_path / "m.parquet", "parquet", rows)
    tasks = plan_shards(InputConfig(path=str(path)), 3, dedup=True)
    assert [t.duplicate_rows for t in tasks] == [(), (4, 5)]
    assert all(not t.duplicate_rows for t in plan_shards(InputConfig(path=str(path)), 3, dedup=False))


def test_folder_groups_files_by_stem(tmp_path):
    for name in ["a.jpg", "a.txt", "a.flac", "b.png", "b.json", "sub/c.wav", "sub/c.txt", "notes.md", ".hidden.jpg"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    cfg = InputConfig(path=str(tmp_path))
    assert list_sources(cfg) == [(str(tmp_path), "folder")]
    rows = read_rows(plan_shards(cfg, 10, False)[0], cfg)
    assert [r.extra["stem"] for r in rows] == ["a", "b", "sub/c"]
    assert rows[0].image.endswith("a.jpg") and rows[0].audio.endswith("a.flac") and rows[0].text_location.endswith("a.txt")
    assert rows[1].json_location.endswith("b.json") and rows[1].audio is None
    assert rows[2].image is None and rows[2].audio.endswith("c.wav")


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        plan_shards(InputConfig(path=str(tmp_path / "nope.parquet")), 10, False)
    with pytest.raises(ValueError, match="matches no file"):
        plan_shards(InputConfig(path=str(tmp_path / "*.csv")), 10, False)
