"""The audio front end: one setting per model, recorded in its release and enforced downstream; a long clip is
cropped at a random, reproducible offset for training and embedded as pooled windows for evaluation; SpecAugment
masks training log-mels only, and only when switched on."""

import dataclasses
import io
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from data_pipeline.config import AudioFeatureConfig, LoaderConfig, SpecAugmentConfig
from data_pipeline.loader.decode import Decoder, decode_audio, window_offsets
from data_pipeline.loader import build_loader
from data_pipeline.loader.melspec import FLOOR, log_mel
from mmfuse.config import CONFIG_ROOT, ConfigError, load_config
from tests.loaderdata import jpeg, write_tar

RATE = 16000
# Windows of 48 frames x 160 samples = 0.48 s: a 3 s clip holds six of them.
SHORT = AudioFeatureConfig(n_mels=16, frames=48)
PRETRAIN = [str(CONFIG_ROOT / "pretrain" / "tiny.yaml")]


def chirp(seconds: float, rate: int = RATE) -> np.ndarray:
    """A tone whose pitch rises through the clip, so that every window of it looks different."""
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * (200 + 400 * t) * t)).astype(np.float32)


def flac(seconds: float) -> bytes:
    out = io.BytesIO()
    sf.write(out, chirp(seconds), RATE, format="FLAC")
    return out.getvalue()


def decoded(seconds: float) -> np.ndarray:
    """The chirp as the FLAC holds it (16-bit samples): what the decoder reads."""
    return sf.read(io.BytesIO(flac(seconds)), dtype="float32")[0]


@pytest.fixture(scope="module")
def tiny():
    from pretrain.model import ModelConfig

    return load_config(ModelConfig, [str(CONFIG_ROOT / "model" / "tiny.yaml")])


def finetune_config(**values):
    from finetune.config import FinetuneConfig

    base = {"task": "zeroshot", "checkpoint": "c", "data.eval": "x", "run.dir": "r", **values}
    return load_config(FinetuneConfig, overrides=[f"{k}={v}" for k, v in base.items()])


# ---- one front end, recorded and enforced ----

def pretrain_config(*overrides):
    from pretrain.config import PRESETS, PretrainConfig

    return load_config(PretrainConfig, PRETRAIN, ["data.train=d", *overrides], presets=PRESETS)


def test_pretrain_mel_shape_follows_the_model_and_a_conflict_names_both_values():
    from pretrain.config import model_audio

    base = ["run.dir=r"]
    cfg = pretrain_config(*base)
    used = model_audio(cfg.data.audio, cfg.model)
    assert (used.n_mels, used.frames) == (cfg.model.audio.n_mels, cfg.model.audio.frames) == (64, 192)
    pretrain_config(*base, "data.audio.frames=192", "data.audio.n_mels=64")  # agrees: fine
    with pytest.raises(ConfigError, match=r"^data\.audio\.frames=200 conflicts with the model's frames=192: .*"
                                          r"set model\.audio\.frames instead$"):
        pretrain_config(*base, "data.audio.frames=200")
    with pytest.raises(ConfigError, match=r"data\.audio\.n_mels=128 conflicts with the model's n_mels=64"):
        pretrain_config(*base, "data.audio.n_mels=128")


def test_release_records_the_runs_front_end_and_older_releases_read_as_the_old_defaults(tiny):
    from pretrain.release import release_config, release_front_end

    audio = AudioFeatureConfig(sample_rate=22050, n_mels=64, n_fft=512, hop_length=320, frames=192, f_min=20.0,
                               f_max=8000.0, max_seconds=12.0)
    release = release_config(tiny, {}, audio=audio)
    recorded = json.loads(json.dumps(release))["preprocess"]["audio"]
    assert recorded["hop_length"] == 320 and recorded["max_seconds"] == 12.0 and "spec_augment" in recorded
    assert release_front_end(release) == {"sample_rate": 22050, "n_mels": 64, "n_fft": 512, "hop_length": 320,
                                          "frames": 192, "f_min": 20.0, "f_max": 8000.0}
    release["preprocess"]["audio"] = {"sample_rate": 16000, "n_mels": 64, "frames": 192, "n_fft": 400, "hop_length": 160}
    assert release_front_end(release) == {"sample_rate": 16000, "n_mels": 64, "n_fft": 400, "hop_length": 160,
                                          "frames": 192, "f_min": 0.0, "f_max": 0.0}


def test_export_records_what_the_run_used_even_from_an_old_config_yaml(tmp_path, tiny):
    """An old run folder's config.yaml holds the loader's unused default frames (200); the release gets the model's
    mel shape and the run's real hop."""
    from omegaconf import OmegaConf

    from mmfuse.config import to_yaml
    from pretrain.export import ExportConfig, export
    from pretrain.model import MultimodalModel

    run = tmp_path / "run"
    checkpoint = run / "checkpoints" / "step_000001"
    checkpoint.mkdir(parents=True)
    cfg = pretrain_config(f"run.dir={run}", "data.audio.hop_length=320")
    old = OmegaConf.create(to_yaml(cfg))
    old.data.audio = {k: v for k, v in old.data.audio.items() if k not in ("max_seconds", "eval_windows", "spec_augment")}
    old.data.audio.frames, old.data.audio.n_mels = 200, 64
    (run / "config.yaml").write_text(OmegaConf.to_yaml(old))
    state = {f"model.{k}": v for k, v in MultimodalModel(cfg.model).state_dict().items()}
    torch.save({"module": state}, checkpoint / "mp_rank_00_model_states.pt")
    (checkpoint / "COMMITTED").write_text(json.dumps({"zero_stage": 0}))
    output = export(ExportConfig(run=str(run), output=dataclasses.replace(ExportConfig().output, path=str(tmp_path / "rel"))))
    audio = json.loads((tmp_path / "rel" / "config.json").read_text())["preprocess"]["audio"]
    assert (audio["hop_length"], audio["frames"], audio["n_mels"], audio["sample_rate"]) == (320, 192, 64, 16000)
    assert output == str(tmp_path / "rel")


def test_finetune_takes_the_front_end_from_the_release_and_refuses_a_conflicting_one(tmp_path, tiny):
    from finetune.checkpoint import audio_front_end, check_checkpoint, load_checkpoint
    from pretrain.model import MultimodalModel
    from pretrain.release import save_release

    release = str(tmp_path / "release")
    trained_on = AudioFeatureConfig(n_mels=64, frames=192, hop_length=320, f_max=6000.0)
    save_release(MultimodalModel(tiny).state_dict(), tiny, release, {}, audio=trained_on)
    with pytest.raises(ConfigError, match=r"^data\.audio\.hop_length=160 conflicts with the checkpoint's "
                                          r"hop_length=320: drop data\.audio\.hop_length"):
        check_checkpoint(finetune_config(checkpoint=release, **{"data.audio.hop_length": 160}))
    with pytest.raises(ConfigError, match=r"data\.audio\.f_max=0\.0 conflicts with the checkpoint's f_max=6000\.0"):
        check_checkpoint(finetune_config(checkpoint=release, **{"data.audio.f_max": 0.0}))
    check_checkpoint(finetune_config(checkpoint=release, **{"data.audio.hop_length": 320}))  # agrees: fine

    (tmp_path / "clip.flac").write_bytes(flac(1.0))
    (tmp_path / "eval.jsonl").write_text(json.dumps({"audio": "clip.flac", "text": "a tone", "label": 0}) + "\n")
    cfg = finetune_config(checkpoint=release, **{"data.eval": tmp_path / "eval.jsonl", "data.workers": 0})
    _, info = load_checkpoint(cfg)
    audio = audio_front_end(cfg.data.audio, info.audio)
    assert (audio.hop_length, audio.f_max, audio.n_mels, audio.frames, audio.n_fft) == (320, 6000.0, 64, 192, 400)
    batch = next(iter(_task_data(cfg, audio)))
    expected, mask = log_mel(decoded(1.0), audio)
    assert int(batch["audio_mask"][0].sum()) == int(mask.sum()) == 50  # 1 s at a 320-sample hop; 100 at 160
    torch.testing.assert_close(batch["audio"][0], expected)


def _task_data(cfg, audio):
    from finetune.data import TaskData

    return TaskData(cfg, "eval", 0, 1, None, None, image_size=32, audio=audio)


# ---- long clips: a random crop for training, pooled windows for evaluation ----

def test_window_offsets_cover_a_long_clip_and_training_draws_one_inside_it():
    assert window_offsets(20, 30, train=True, max_windows=4) == [0]
    assert window_offsets(100, 30, train=False, max_windows=10) == [0, 23, 47, 70]
    assert window_offsets(100, 30, train=False, max_windows=2) == [0, 70]
    torch.manual_seed(0)
    drawn = {window_offsets(100, 30, train=True, max_windows=4)[0] for _ in range(50)}
    assert len(drawn) > 10 and min(drawn) >= 0 and max(drawn) <= 70


def test_training_crop_is_random_per_draw_reproducible_per_seed_and_bounded_by_max_seconds():
    clip = flac(3.0)

    def crop(seed, cfg=SHORT):
        torch.default_generator.manual_seed(seed)
        windows = decode_audio(clip, cfg, train=True)
        assert len(windows) == 1
        return windows[0][0]

    crops = [crop(seed) for seed in range(8)]
    assert torch.equal(crop(3), crops[3])
    assert len({tuple(c[:, 0].tolist()) for c in crops}) == 8  # each seed its own window
    first_seconds, _ = log_mel(decoded(3.0), SHORT)
    assert sum(torch.equal(c, first_seconds) for c in crops) <= 1  # not always the clip's start
    # With max_seconds=0.5 only the first 0.5 s count: a crop's 7680 samples lie within the first 8000.
    bounded = dataclasses.replace(SHORT, max_seconds=0.5)
    starts = {tuple(crop(seed, bounded)[:, 0].tolist()) for seed in range(8)}
    waveform = decoded(3.0)
    allowed = {tuple(log_mel(waveform[o:], bounded)[0][:, 0].tolist()) for o in range(0, 321)}
    assert len(starts) > 1 and starts <= allowed


def test_loader_crops_differ_across_samples_and_epochs_and_repeat_for_the_same_seed(tmp_path):
    clip = flac(3.0)
    items = [{"__key__": f"s{i:03d}", "jpg": jpeg(i), "txt": b"a tone", "flac": clip} for i in range(8)]
    write_tar(tmp_path / "shard-000000.tar", items)
    (tmp_path / "sizes.json").write_text(json.dumps({"shard-000000.tar": 8}))
    cfg = load_config(LoaderConfig, [], [f"train={tmp_path}", "batch_size=8", "workers=0", "shuffle_window=1",
                                         "audio.n_mels=16", "audio.frames=48"])

    def epochs(n):
        loader = build_loader(cfg, 0, 1)
        return [{key: mel for key, mel in zip(batch["__key__"], batch["audio"])} for _ in range(n) for batch in loader]

    first, second = epochs(2)
    again = epochs(1)[0]
    assert all(torch.equal(first[k], again[k]) for k in first)  # same seed, epoch, sample: same window
    assert len({tuple(mel[:, 0].tolist()) for mel in first.values()}) > 4  # the same clip, cropped per sample
    assert any(not torch.equal(first[k], second[k]) for k in first)  # a new epoch, new windows
    assert "audio_more" not in next(iter(build_loader(cfg, 0, 1)))  # training batches: one window each


def test_evaluation_embeds_a_long_clip_as_its_pooled_windows(tiny):
    from pretrain.evaluate import embed_rows
    from pretrain.model import MultimodalModel

    model_cfg = dataclasses.replace(tiny, audio=dataclasses.replace(tiny.audio, n_mels=16, frames=48))
    torch.manual_seed(0)
    model = MultimodalModel(model_cfg).eval()
    decoder = Decoder(LoaderConfig(train="unused", audio=SHORT), None, None, 32, train=False)
    long, short = flac(3.0), flac(0.3)
    samples = [{"__key__": key, "meta": {}, **decoder.decode_clip(data)} for key, data in (("long", long), ("short", short))]
    batch = decoder.collate(samples)
    assert batch["audio_more"].shape == (SHORT.eval_windows - 1, 16, 48) and batch["audio_more_owner"].tolist() == [0, 0, 0]
    windows = [mel for mel, _ in decode_audio(long, SHORT, train=False)]
    with torch.no_grad():
        pooled = embed_rows(model, "audio", batch, torch.tensor([0, 1]))
        each = model.embed("audio", torch.stack(windows))
        torch.testing.assert_close(pooled[0], torch.nn.functional.normalize(each.mean(0), dim=-1))
        first_only = model.embed("audio", batch["audio"][:1])[0]
        assert not torch.allclose(pooled[0], first_only, atol=1e-4)
        torch.testing.assert_close(pooled[1], model.embed("audio", batch["audio"][1:])[0])  # one window: as before
        torch.testing.assert_close(embed_rows(model, "audio", batch, torch.tensor([1]))[0], pooled[1])
    assert len(decode_audio(long, dataclasses.replace(SHORT, eval_windows=1), train=False)) == 1
    assert len(decode_audio(long, dataclasses.replace(SHORT, max_seconds=1.0), train=False)) == 3


# ---- SpecAugment ----

def test_spec_augment_masks_training_log_mels_only_when_on_with_the_padding_floor():
    clip = flac(0.3)  # shorter than a window: no crop, so masks are the only difference
    augmented = dataclasses.replace(SHORT, spec_augment=SpecAugmentConfig(freq_masks=2, freq_width=4, time_masks=2,
                                                                          time_width=6))
    plain, mask = decode_audio(clip, SHORT, train=False)[0]
    torch.manual_seed(0)
    assert torch.equal(decode_audio(clip, SHORT, train=True)[0][0], plain)  # off by default
    assert torch.equal(decode_audio(clip, augmented, train=False)[0][0], plain)  # never at evaluation

    def masked(seed):
        torch.default_generator.manual_seed(seed)
        return decode_audio(clip, augmented, train=True)[0]

    mel, train_mask = masked(1)
    assert torch.equal(train_mask, mask)  # the signal is still there: the valid mask is unchanged
    changed = mel != plain
    assert changed.any() and (mel[changed] == FLOOR).all()
    assert (plain[:, ~mask] == FLOOR).all()  # padding holds the same floor
    assert torch.equal(masked(1)[0], mel)  # reproducible from the sample's seed
    assert any(not torch.equal(masked(seed)[0], mel) for seed in range(2, 6))


def test_spec_augment_settings_are_checked():
    with pytest.raises(ConfigError, match="spec_augment"):
        load_config(LoaderConfig, [], ["train=x", "audio.spec_augment.time_masks=-1"])
    with pytest.raises(ConfigError, match="eval_windows"):
        load_config(LoaderConfig, [], ["train=x", "audio.eval_windows=0"])
