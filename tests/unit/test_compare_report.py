"""``mmfuse report RUN RUN ... output.path=DIR``: config differences, overlaid curves and final metrics of several
run folders, written as the trainers write them (config.yaml from the real schemas, metrics.jsonl rows)."""

import json

import pytest

from mmfuse.cli import main as cli
from mmfuse.config import load_config, to_yaml
from mmfuse.report import split_runs

pytestmark = pytest.mark.timeout(120)

PNG = b"\x89PNG\r\n\x1a\n"
SECRETS = ("AKIAEXAMPLE", "wJalrXUtnFEMI", "SIGNATURESECRET")


def pretrain_run(folder, overrides, rows):
    from pretrain.config import PretrainConfig

    folder.mkdir(parents=True)
    cfg = load_config(PretrainConfig, ["configs/pretrain/tiny.yaml"],
                      ["data.train=data/shapes", f"run.dir={folder}", *overrides])
    # Not redacted on purpose: a config.yaml from before the trainer redacted it, or edited by hand.
    (folder / "config.yaml").write_text(to_yaml(cfg))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def pretrain_rows(scale, last_loss=None):
    rows = []
    for step in (10, 20, 30, 40):
        rows.append({"step": step, "loss": scale / step, "loss/contrastive/image_text": 0.5 * scale / step,
                     "loss/masked_image": 0.25 * scale / step, "lr": 1e-3, "grad_norm": 1.0, "samples_seen": 32 * step})
    if last_loss is not None:
        rows[-1]["loss"] = last_loss
    rows.insert(2, {"step": 20, "eval/samples": 256.0, "eval/zeroshot/image/top1": 10.0 * scale,
                    "eval/zeroshot/chance_top1": 3.3333, "eval/retrieval/image_to_text/R@1": 4.0 * scale})
    rows.append({"step": 40, "eval/samples": 256.0, "eval/zeroshot/image/top1": 20.0 * scale,
                 "eval/zeroshot/chance_top1": 3.3333, "eval/retrieval/image_to_text/R@1": 8.5 * scale})
    return rows


def finetune_run(folder, jsonl=True):
    from finetune.config import FinetuneConfig

    folder.mkdir(parents=True)
    cfg = load_config(FinetuneConfig, ["configs/finetune/zeroshot.yaml"],
                      ["checkpoint=releases/tiny", "data.eval=data/heldout", f"run.dir={folder}"])
    (folder / "config.yaml").write_text(to_yaml(cfg))
    final = {"top1": 61.25, "top5": 90.0, "samples": 200.0, "skipped_samples": 0.0}
    if jsonl:  # the trainer's lines: training, then the train/ counts, then the final evaluation
        rows = [{"step": 10, "loss": 2.0, "lr": 1e-4, "samples_per_s": 50.0},
                {"step": 20, "loss": 1.5, "lr": 1e-4, "samples_per_s": 51.0},
                {"step": 20, "train/samples": 1280, "train/skipped_samples": 0},
                {"step": 20, **{f"eval/{k}": v for k, v in final.items()}}]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = {"task": "zeroshot", "step": 20 if jsonl else 0, "metrics": final, "chance": {"top1": 3.33, "top5": None}}
    if jsonl:  # run.baseline=true: the untrained heads, evaluated before training
        summary["baseline"] = {"top1": 7.5, "top5": 20.0}
    (folder / "metrics.json").write_text(json.dumps(summary))
    return folder


def table(report, heading):
    """The Markdown table under ``## heading`` as {first cell: [the other cells]}."""
    section = report.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split(" | ") for line in section.splitlines() if line.startswith("| ")]
    return {row[0].strip(): [cell.strip() for cell in row[1:]] for row in rows[1:]}


def report_of(tmp_path, *runs):
    out = tmp_path / "report"
    assert cli(["report", *map(str, runs), f"output.path={out}"]) == 0
    return out, (out / "REPORT.md").read_text()


def assert_png(path):
    from PIL import Image

    assert path.read_bytes().startswith(PNG)
    with Image.open(path) as image:
        image.load()  # decodes every pixel
        assert image.width > 100 and image.height > 100


def test_two_pretraining_runs_differ_in_exactly_their_changed_keys_and_their_final_metrics(tmp_path):
    a = pretrain_run(tmp_path / "runs" / "base", ["data.train=s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/shapes"],
                     pretrain_rows(1.0))
    b = pretrain_run(tmp_path / "runs" / "big-lr", [
        "data.train=https://host/shapes?X-Amz-Signature=SIGNATURESECRET", "optim.lr=0.003", "data.batch_size=16"],
        pretrain_rows(2.0, last_loss=float("nan")))
    out, report = report_of(tmp_path, a, b)

    differences = table(report, "Config differences")
    assert set(differences) == {"`data.train`", "`optim.lr`", "`data.batch_size`", "`run.dir`"}
    assert differences["`optim.lr`"] == ["`0.001`", "`0.003`"]
    assert differences["`data.batch_size`"] == ["`32`", "`16`"]
    assert differences["`data.train`"] == ["`s3://bucket/shapes`", "`https://host/shapes?<redacted>`"]
    assert not any(secret in report for secret in SECRETS)

    final = table(report, "Final metrics")
    assert final["steps"] == ["40", "40"] and final["samples_seen"] == ["1280", "1280"]
    assert final["last eval at step"] == ["40", "40"]
    assert final["loss"] == ["0.025", "nan"]  # the last value logged, a diverged run's NaN included
    assert final["loss/masked_image"] == ["0.00625", "0.0125"]
    assert final["eval/zeroshot/image/top1"] == ["20", "40"]
    assert final["eval/retrieval/image_to_text/R@1"] == ["8.5", "17"]
    assert final["eval/zeroshot/chance_top1"] == ["3.333", "3.333"]
    assert final["eval/zeroshot/image/top1 (chance)"] == ["3.333", "3.333"]
    assert "lr" not in final and "grad_norm" not in final
    assert "`base`: pre-training" in report and "![curves](curves.png)" in report
    assert_png(out / "curves.png")


def test_one_run_has_no_differences_to_show_but_its_curves_and_metrics(tmp_path):
    run = pretrain_run(tmp_path / "solo", [], pretrain_rows(1.0))
    out, report = report_of(tmp_path, run)
    assert "# Comparing 1 run\n" in report and "One run: nothing to compare." in report
    assert "| key |" not in report
    assert table(report, "Final metrics")["eval/zeroshot/image/top1"] == ["20"]
    assert_png(out / "curves.png")


def test_identical_configs_say_so(tmp_path):
    a = pretrain_run(tmp_path / "a", ["run.dir=same"], pretrain_rows(1.0))
    b = pretrain_run(tmp_path / "b", ["run.dir=same"], pretrain_rows(1.5))
    _, report = report_of(tmp_path, a, b)
    assert "The configs are the same." in report and "| key |" not in report


def test_a_run_from_before_a_key_was_renamed_compares_under_the_new_name(tmp_path):
    """model.lock became model.freeze: an old run's config.yaml still says lock, and the report must not list both
    keys as differences of two runs that froze the same tower."""
    old = pretrain_run(tmp_path / "old", ["run.dir=same", "model.freeze=[image]"], pretrain_rows(1.0))
    (old / "config.yaml").write_text((old / "config.yaml").read_text().replace("freeze:", "lock:"))
    new = pretrain_run(tmp_path / "new", ["run.dir=same", "model.freeze=[image]"], pretrain_rows(1.5))
    _, report = report_of(tmp_path, old, new)
    assert "lock:" in (old / "config.yaml").read_text() and "The configs are the same." in report


def test_pretraining_and_finetuning_runs_side_by_side(tmp_path):
    pre = pretrain_run(tmp_path / "pre", [], pretrain_rows(1.0))
    fine = finetune_run(tmp_path / "zs")
    evaluated = finetune_run(tmp_path / "zs-eval", jsonl=False)  # metrics.json alone
    out, report = report_of(tmp_path, pre, fine, evaluated)
    assert "`zs`: fine-tuning (zeroshot)" in report and "`zs-eval`: evaluation (zeroshot)" in report
    differences = table(report, "Config differences")
    assert differences["`task`"] == ["(absent)", "`zeroshot`", "`zeroshot`"]
    assert "`run.dir`" in differences and "`zeroshot.modality`" in differences
    final = table(report, "Final metrics")
    assert final["steps"] == ["40", "20", "0"]
    assert final["samples_seen"] == ["1280", "-", "-"] and final["train/samples"] == ["-", "1280", "-"]
    assert final["eval/top1"] == ["-", "61.25", "61.25"] and final["loss"] == ["0.025", "1.5", "-"]
    assert final["eval/top1 (chance)"] == ["-", "3.33", "3.33"] and "eval/top5 (chance)" not in final
    assert final["eval/top1 (untrained)"] == ["-", "7.5", "-"] and final["eval/top5 (untrained)"] == ["-", "20", "-"]
    assert differences["`data.eval`"] == ['`""`', "`data/heldout`", "`data/heldout`"]  # an empty string shows as one
    assert_png(out / "curves.png")


def test_two_runs_with_one_folder_name_are_told_apart_by_their_paths(tmp_path):
    a = pretrain_run(tmp_path / "x" / "run", [], pretrain_rows(1.0))
    b = pretrain_run(tmp_path / "y" / "run", [], pretrain_rows(2.0))
    _, report = report_of(tmp_path, a, b)
    assert f"| metric | `{a}` | `{b}` |" in report


@pytest.mark.parametrize("make, says", [
    (lambda p: p, "not a run folder (no config.yaml)"),  # never created
    (lambda p: (p.mkdir(), p)[1], "not a run folder (no config.yaml)"),
    (lambda p: (p.mkdir(), (p / "config.yaml").write_text("run: {dir: x}\n"), p)[2], "no metrics"),
    (lambda p: (p.mkdir(), (p / "config.yaml").write_text("run: {dir: x}\n"),
                (p / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1, "lo'), p)[3], "no metrics"),
])
def test_a_folder_that_is_not_a_run_or_has_no_metrics_is_one_line_naming_it(tmp_path, capsys, make, says):
    good = pretrain_run(tmp_path / "good", [], pretrain_rows(1.0))
    bad = make(tmp_path / "bad")
    assert cli(["report", str(good), str(bad), f"output.path={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mmfuse report: config error: {bad}: {says}") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "REPORT.md").exists()


def test_no_run_is_an_error_and_a_config_file_is_not_taken_for_a_run(tmp_path, capsys):
    assert cli(["report", f"output.path={tmp_path}"]) == 2
    assert "no run folder given" in capsys.readouterr().err
    settings = tmp_path / "report.yaml"
    settings.write_text(f"output:\n  path: {tmp_path / 'out'}\n")
    assert split_runs(["a", "--config", str(settings), "b", "output.path=x"]) == (
        ["a", "b"], ["--config", str(settings), "output.path=x"])
    run = pretrain_run(tmp_path / "r", [], pretrain_rows(1.0))
    assert cli(["report", "--config", str(settings), str(run)]) == 0
    assert (tmp_path / "out" / "REPORT.md").is_file()
