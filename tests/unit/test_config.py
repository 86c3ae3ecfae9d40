import re
from dataclasses import dataclass, field

import pytest

from data_pipeline.config import ShardConfig
from mmfuse.cli import STAGES
from mmfuse.config import MISSING, ConfigError, field_docs, help_text, load_config, parse_args


@dataclass
class Inner:
    size: int = 3
    """How big."""
    name: str = "a"


@dataclass
class Root:
    path: str = MISSING
    """Where."""
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)
    ratio: float = 0.5

    def validate(self):
        if self.inner.size < 0:
            raise ConfigError("inner.size must be >= 0")


def test_precedence_defaults_then_files_then_overrides(tmp_path):
    first = tmp_path / "a.yaml"
    first.write_text("path: /a\ninner:\n  size: 5\n  name: file\n")
    second = tmp_path / "b.yaml"
    second.write_text("inner:\n  size: 7\n")
    cfg = load_config(Root, [str(first), str(second)], ["inner.name=cli", "tags=[x,y]"])
    assert (cfg.path, cfg.inner.size, cfg.inner.name, cfg.tags, cfg.ratio) == ("/a", 7, "cli", ["x", "y"], 0.5)
    assert isinstance(cfg, Root) and isinstance(cfg.inner, Inner)


def test_yaml_boolean_words_stay_strings_where_a_string_is_expected():
    # YAML 1.1 reads no/off/yes/on as booleans: image.resize_mode=no must mean "no", not "False".
    cfg = load_config(ShardConfig, [], ["input.path=m.parquet", "output.path=out", "image.resize_mode=no"])
    assert cfg.image.resize_mode == "no"
    assert load_config(Root, [], ["path=x", "inner.name=off"]).inner.name == "off"
    assert load_config(Root, [], ["path=no"]).path == "no"  # a required string, not yet set
    with pytest.raises(ConfigError, match="inner.size"):  # a number field still refuses a boolean word
        load_config(Root, [], ["path=x", "inner.size=no"])


def test_an_empty_value_is_the_empty_string_for_a_string_field():
    assert load_config(Root, [], ["path=x", "inner.name="]).inner.name == ""  # YAML reads `name=` as null
    assert load_config(Root, [], ["path=x", "inner.name=Mirror: https://x/y"]).inner.name == "Mirror: https://x/y"
    with pytest.raises(ConfigError, match="inner.size"):
        load_config(Root, [], ["path=x", "inner.size="])


def test_a_value_yaml_cannot_read_says_how_to_quote_it():
    with pytest.raises(ConfigError, match=r"quote it: \"inner.name='\{image_id\}.png'\""):
        load_config(Root, [], ["path=x", "inner.name={image_id}.png"])


def test_a_list_of_templates_typed_without_quotes_is_a_list_of_strings():
    cfg = load_config(Root, [], ["path=x", "tags=[a photo of a {}., a {}]"])
    assert cfg.tags == ["a photo of a {}.", "a {}"]
    assert load_config(Root, [], ["path=x", "tags=[{} here, 'a {}, quoted', \"b {}\"]"]).tags == ["{} here", "a {}, quoted", "b {}"]
    with pytest.raises(ConfigError, match="inner.size"):
        load_config(Root, [], ["path=x", "inner.size=[a {}]"])


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="inner.sise"):
        load_config(Root, [], ["path=x", "inner.sise=3"])


def test_unknown_key_in_yaml_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("path: x\nbogus: 1\n")
    with pytest.raises(ConfigError, match="bogus"):
        load_config(Root, [str(bad)])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="inner.size"):
        load_config(Root, [], ["path=x", "inner.size=big"])


def test_missing_required_is_named():
    with pytest.raises(ConfigError, match="'path'"):
        load_config(Root, [], [])


def test_validate_runs_at_load():
    with pytest.raises(ConfigError, match="inner.size must be"):
        load_config(Root, [], ["path=x", "inner.size=-1"])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config(Root, ["/nonexistent.yaml"], ["path=x"])


def test_parse_args_positional_and_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("ratio: 2.0\n")
    cfg = parse_args(Root, ["somewhere", "--config", str(f), "inner.size=1"], prog="t", positional="path")
    assert (cfg.path, cfg.ratio, cfg.inner.size) == ("somewhere", 2.0, 1)
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_args(Root, ["--frobnicate"], prog="t")


def test_help_lists_every_key_with_default_and_doc(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(Root, ["--help"], prog="tool")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "path = (required)" in out and "Where." in out
    assert "inner.size = 3" in out and "How big." in out
    assert "inner.name = 'a'" in out and "tags = []" in out


def test_shard_help_documents_every_field():
    text = help_text(ShardConfig, "mmfuse shard")
    for key in ("input.path", "output.samples_per_shard", "fetch.timeout", "image.resize_mode", "audio.sample_rate", "dedup"):
        assert key in text
    # Every leaf field of the sharding config has a help line.
    assert all(field_docs(cls) for cls in (ShardConfig,))


@pytest.mark.parametrize("override, key", [
    ("image.resize_mode=stretch", "image.resize_mode"),
    ("image.format=gif", "image.format"),
    ("input.format=xml", "input.format"),
    ("require=[image,smell]", "require"),
])
def test_shard_config_rejects_bad_combinations(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(ShardConfig, [], ["input.path=x", "output.path=y", override])


@pytest.mark.parametrize("path", sorted(__import__("pathlib").Path("configs/data").glob("*.yaml")), ids=str)
def test_shipped_data_configs_load(path):
    cfg = load_config(ShardConfig, [str(path)], ["input.path=x", "output.path=y"])
    assert isinstance(cfg, ShardConfig)


# What each shipped pre-training preset trains: the modalities its enabled objectives read. A new preset is added
# here, with what it is for.
PRETRAIN_PRESETS = {"tiny": {"image", "text", "audio"}, "image_text": {"image", "text"},
                    "audio_text": {"audio", "text"}, "image_text_audio": {"image", "text", "audio"}}


@pytest.mark.parametrize("path", sorted(__import__("pathlib").Path("configs/pretrain").glob("*.yaml")), ids=str)
def test_shipped_pretrain_configs_load_alone_and_with_every_flavor(path, tmp_path):
    import yaml

    from pretrain.config import PRESETS, PretrainConfig
    from pretrain.model.config import ModelConfig
    from pretrain.objectives.config import read_modalities

    required = ["run.dir=r", "data.train=d"]
    cfg = load_config(PretrainConfig, [str(path)], required, PRESETS)
    assert read_modalities(cfg.objectives) == PRETRAIN_PRESETS[path.stem]
    # The flavor file, stacked last, sets its fields over the preset's; the preset's other model fields stay.
    preset_model = yaml.safe_load(path.read_text()).get("model", {})
    preset_model.pop("flavor", None)
    (tmp_path / "preset_model.yaml").write_text(yaml.safe_dump(preset_model))
    for flavor in sorted(__import__("pathlib").Path("configs/model").glob("*.yaml")):
        try:
            expected = load_config(ModelConfig, [str(tmp_path / "preset_model.yaml"), str(flavor)])
        except ConfigError as err:  # e.g. a preset's conv stem on vit-l-14's 14 px patches: the same error, stacked
            with pytest.raises(ConfigError, match=re.escape(str(err))):
                load_config(PretrainConfig, [str(path), str(flavor)], required, PRESETS)
            continue
        stacked = load_config(PretrainConfig, [str(path), str(flavor)], required, PRESETS)
        assert stacked.model == expected, flavor
        assert (stacked.objectives, stacked.data, stacked.eval) == (cfg.objectives, cfg.data, cfg.eval), flavor


@pytest.mark.parametrize("stage", list(STAGES))  # every stage of mmfuse --help
def test_help_and_config_errors_import_neither_torch_nor_deepspeed(stage):
    """What makes them come back in a fraction of a second instead of 5-25 s."""
    import subprocess
    import sys

    script = ("import sys\nfrom mmfuse.cli import main\n"
              f"for argv in (['{stage}', '--help'], ['{stage}', 'no.such.key=1']):\n"
              "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
              "print(sorted(m for m in ('torch', 'deepspeed', 'open_clip') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
