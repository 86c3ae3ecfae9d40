"""Registries are the only list of names: duplicates refused, unknown names answered with the known ones, and
the names known without importing the implementations (or torch)."""

import dataclasses
import subprocess
import sys

import pytest

from mmfuse.registry import Registry
from mmfuse.schema import ConfigError


class Tar:
    pass


def test_a_duplicate_name_is_refused_and_an_unknown_one_lists_the_known():
    registry = Registry("writer")
    registry.add("tar", "tests.unit.test_registry:Tar")
    with pytest.raises(ValueError, match="writer 'tar' is registered twice: tests.unit.test_registry:Tar and x:Y"):
        registry.add("tar", "x:Y")
    with pytest.raises(ValueError, match="not a 'module:attribute' path"):
        registry.add("parquet", "collections.Counter")
    with pytest.raises(ConfigError, match=r"output.format='zip' is not a known writer; known: tar"):
        registry.check("zip", "output.format")
    with pytest.raises(ConfigError, match="not a known writer"):
        registry["zip"]
    assert registry["tar"] is Tar and Tar.name == "tar" and registry.names() == ("tar",) and "tar" in registry


def test_objective_names_come_from_one_registry_that_matches_the_config():
    from pretrain.objectives import OBJECTIVES, ObjectivesConfig, build_objectives, objective_weights

    sub_configs = [f.name for f in dataclasses.fields(ObjectivesConfig) if hasattr(getattr(ObjectivesConfig(), f.name), "weight")]
    assert list(OBJECTIVES) == sub_configs
    cfg = ObjectivesConfig()
    for name in OBJECTIVES:
        getattr(cfg, name).weight = 1.0
    assert list(objective_weights(cfg)) == list(OBJECTIVES)
    assert [objective.name for objective in build_objectives(cfg)] == list(OBJECTIVES)


def test_task_names_come_from_the_registry_for_config_help_and_building():
    from finetune.run import DESCRIPTION
    from finetune.tasks import TASKS

    assert TASKS.names() == ("zeroshot", "retrieval", "caption", "vqa", "classify")
    assert ", ".join(TASKS) in DESCRIPTION["finetune"]
    for name in TASKS:
        assert callable(TASKS[name]) and TASKS[name].name == name


def test_reading_configs_and_names_imports_no_implementation():
    code = ("import sys, finetune.config, finetune.tasks, pretrain.objectives, pretrain.config; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('finetune.tasks.', "
            "'pretrain.objectives.')) and not m.endswith('.config')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_renamed_key_works_for_a_release_with_one_warning(tmp_path, caplog):
    """One name per idea (pre-training's engine.zero_stage / engine.precision in fine-tuning too, freeze for
    model.lock): the old names still load, in a file, an override and a release's config.json, and say so."""
    from finetune.config import FinetuneConfig
    from mmfuse.config import load_config
    from pretrain.config import PRESETS, PretrainConfig
    from pretrain.release import _model_config

    common = ["task=retrieval", "checkpoint=c", "data.eval=e", "run.dir=r"]
    with caplog.at_level("WARNING", logger="mmfuse.config"):
        cfg = load_config(FinetuneConfig, [], [*common, "run.deepspeed_stage=2", "run.precision=no"])
    assert (cfg.engine.zero_stage, cfg.engine.precision) == (2, "fp32")
    assert "config key 'run.deepspeed_stage' is now 'engine.zero_stage'" in caplog.text
    assert "config key 'run.precision' is now 'engine.precision'" in caplog.text

    old = tmp_path / "old.yaml"
    old.write_text("model:\n  lock: [image]\n")
    caplog.clear()
    with caplog.at_level("WARNING", logger="mmfuse.config"):
        cfg = load_config(PretrainConfig, [str(old)], ["run.dir=r", "data.train=t"], presets=PRESETS)
        assert load_config(PretrainConfig, [], ["run.dir=r", "data.train=t", "model.lock=[text]"],
                           presets=PRESETS).model.freeze == ["text"]
    assert cfg.model.freeze == ["image"] and f"{old}: config key 'model.lock' is now 'model.freeze'" in caplog.text
    assert _model_config({"flavor": "tiny", "lock": ["audio"]}).freeze == ["audio"]
    flavor_file = tmp_path / "flavor.yaml"  # a file for model: whose only key is an old name still mounts there
    flavor_file.write_text("lock: [text]\n")
    assert load_config(PretrainConfig, [str(flavor_file)], ["run.dir=r", "data.train=t"], presets=PRESETS).model.freeze == ["text"]
    assert load_config(FinetuneConfig, [], [*common, "run={precision: bf16, keep: 3}"]).engine.precision == "bf16"
    both = tmp_path / "both.yaml"
    both.write_text("run: {precision: bf16}\nengine: {precision: fp16}\n")
    with pytest.raises(ConfigError, match="sets both run.precision and engine.precision"):
        load_config(FinetuneConfig, [str(both)], common)
    with pytest.raises(ConfigError, match="engine.zero_stage must be 0"):
        load_config(FinetuneConfig, [], [*common, "run.deepspeed_stage=3"])
