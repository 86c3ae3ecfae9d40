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
