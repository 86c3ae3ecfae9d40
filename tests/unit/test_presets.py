"""Pre-training presets (configs/pretrain/) and model flavors (configs/model/) stacked with --config."""

import dataclasses

import pytest

from mmfuse.config import ConfigError, load_config, parse_args, to_yaml
from pretrain.config import PRESETS, PretrainConfig
from pretrain.model.config import ModelConfig

REQUIRED = ["run.dir=r", "data.train=d"]
IMAGE_TEXT = "configs/pretrain/image_text.yaml"
SMALL = "configs/model/small.yaml"


def pretrain(*files, overrides=()):
    return load_config(PretrainConfig, list(files), [*REQUIRED, *overrides], PRESETS)


def test_a_flavor_file_stacked_on_a_preset_sizes_the_model_and_keeps_the_preset():
    alone, stacked = pretrain(IMAGE_TEXT), pretrain(IMAGE_TEXT, SMALL)
    assert stacked.model == load_config(ModelConfig, [SMALL])  # every field of the flavor, under model
    assert (stacked.model.flavor, stacked.model.image.width) == ("small", 256)
    assert (alone.model.flavor, alone.model.image.width) == ("tiny", 64)
    assert stacked.objectives == alone.objectives and stacked.objectives.contrastive.pairs["audio_text"] == 0
    assert (stacked.data.batch_size, stacked.optim.lr) == (alone.data.batch_size, alone.optim.lr) == (128, 2e-3)


def test_the_flavor_file_stacks_on_either_side_of_a_preset_that_names_no_flavor():
    assert pretrain(SMALL, IMAGE_TEXT) == pretrain(IMAGE_TEXT, SMALL)


def test_the_command_line_stacks_the_same_way():
    argv = ["--config", IMAGE_TEXT, "--config", "configs/model/vit-b-16.yaml", *REQUIRED, "model.image.layers=3"]
    cfg = parse_args(PretrainConfig, argv, prog="mmfuse pretrain", presets=PRESETS)
    assert (cfg.model.flavor, cfg.model.open_clip_name, cfg.model.image.width, cfg.model.image.layers) == (
        "vit-b-16", "ViT-B-16", 768, 3)


def test_later_files_win_then_overrides_win(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("model:\n  image: {layers: 3, heads: 2}\ndata: {batch_size: 7}\n")
    cfg = pretrain(IMAGE_TEXT, SMALL, str(mine))
    assert (cfg.model.image.width, cfg.model.image.layers, cfg.model.image.heads, cfg.data.batch_size) == (256, 3, 2, 7)
    assert pretrain(IMAGE_TEXT, str(mine), SMALL).model.image.layers == 6  # the flavor file, later, wins
    cfg = pretrain(IMAGE_TEXT, SMALL, str(mine), overrides=["model.image.layers=5", "data.batch_size=9"])
    assert (cfg.model.image.layers, cfg.data.batch_size) == (5, 9)


def test_model_flavor_still_picks_a_size():
    assert pretrain(IMAGE_TEXT, overrides=["model.flavor=small"]).model == pretrain(IMAGE_TEXT, SMALL).model
    assert pretrain(IMAGE_TEXT, overrides=["model.flavor=small", "model.image.layers=4"]).model.image.layers == 4


def test_a_flavor_file_and_a_later_different_flavor_are_refused(tmp_path):
    # The model would be one flavor's base with the other's fields: vit-b-16's open_clip_name on a small model.
    with pytest.raises(ConfigError, match=r"vit-b-16.yaml sets model.flavor='vit-b-16'.*model.flavor='small'"):
        pretrain(IMAGE_TEXT, "configs/model/vit-b-16.yaml", SMALL)
    names_tiny = tmp_path / "names_tiny.yaml"  # a preset that names its flavor, as configs/pretrain/tiny.yaml does
    names_tiny.write_text("model: {flavor: tiny}\ndata: {batch_size: 8}\n")
    with pytest.raises(ConfigError, match=r"small.yaml sets model.flavor='small'.*model.flavor='tiny'"):
        pretrain(SMALL, str(names_tiny))
    with pytest.raises(ConfigError, match=r"model.flavor='tiny'"):
        pretrain(IMAGE_TEXT, SMALL, overrides=["model.flavor=tiny"])
    assert pretrain(str(names_tiny), SMALL).model == pretrain(IMAGE_TEXT, SMALL).model  # the flavor file last: fine


def test_a_flavor_file_of_ones_own_stacks_without_a_shipped_preset(tmp_path):
    wide = tmp_path / "wide.yaml"
    small = open(SMALL).read()
    wide.write_text(small.replace("flavor: small", "flavor: wide").replace("width: 256, layers: 6", "width: 384, layers: 6", 1))
    cfg = pretrain(IMAGE_TEXT, str(wide))
    assert (cfg.model.flavor, cfg.model.image.width, cfg.model.text.width) == ("wide", 384, 256)
    with pytest.raises(ConfigError, match="model.flavor='wider': no such preset"):
        pretrain(IMAGE_TEXT, overrides=["model.flavor=wider"])


@pytest.mark.parametrize("text, key", [
    ("data: {batch_size: 8}\nimage: {width: 64}\n", "'image'"),  # a model key at the top of a pretrain file
    ("flavor: small\nembed_dmi: 64\n", "'model.embed_dmi'"),  # a typo in a flavor file
    ("model:\n  image: {widht: 64}\n", "'model.image.widht'"),
    ("bogus: 1\n", "'bogus'"),
])
def test_a_misplaced_or_unknown_key_is_named_on_one_line(tmp_path, text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        pretrain(IMAGE_TEXT, str(path))
    assert str(err.value) == f"unknown config key {key}"


def test_the_recorded_config_holds_the_stacked_values(tmp_path):
    """What the trainer writes to RUN/config.yaml (to_yaml of the loaded config) loads back to the same config,
    without the presets (as export reads it) and with them (a resume's command line)."""
    cfg = pretrain("configs/pretrain/image_text_audio.yaml", IMAGE_TEXT, SMALL, overrides=["model.image.layers=4"])
    recorded = tmp_path / "config.yaml"
    recorded.write_text(to_yaml(cfg))
    assert load_config(PretrainConfig, [str(recorded)]) == cfg
    assert load_config(PretrainConfig, [str(recorded)], presets=PRESETS) == cfg
    text = recorded.read_text()
    assert "flavor: small" in text and "layers: 4" in text and "batch_size: 128" in text  # preset, flavor, override
    assert cfg.objectives.masked_image.weight == 0.5  # image_text_audio.yaml's, which image_text.yaml leaves alone
    assert dataclasses.asdict(cfg.objectives.contrastive)["pairs"]["audio_text"] == 0.0  # image_text.yaml's, later
