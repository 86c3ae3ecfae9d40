"""In-loop evaluation scores every sample once, whatever the number of ranks: 2 gloo ranks == 1 rank."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def run_eval(rank, world_size, shards):
    import open_clip

    from data_pipeline.config import LoaderConfig
    from mmfuse.config import load_config
    from pretrain.evaluate import EvalConfig, evaluate
    from pretrain.model import ModelConfig, MultimodalModel

    torch.manual_seed(0)
    model = MultimodalModel(load_config(ModelConfig, ["configs/model/tiny.yaml"]))
    data = load_config(LoaderConfig, [], [f"train={shards}", "workers=0", "audio.frames=192"])
    return evaluate(model, data, EvalConfig(batch_size=7), rank, world_size, torch.device("cpu"),
                    open_clip.image_transform(64, is_train=False),
                    open_clip.tokenizer.SimpleTokenizer(context_length=32), 64)


def worker(rank, port, shards, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    results[rank] = run_eval(rank, 2, shards)
    dist.destroy_process_group()


def test_two_rank_eval_equals_one_rank(tmp_path):
    from mmfuse.cli import main as cli

    assert cli(["synth", f"output.path={tmp_path}/raw", "num_samples=40", "image_size=64", "seed=2"]) == 0
    assert cli(["shard", f"input.path={tmp_path}/raw/manifest.parquet", f"output.path={tmp_path}/shards",
                "output.samples_per_shard=10", "image.size=64", "image.resize_mode=center_crop", "progress=false"]) == 0
    single = run_eval(0, 1, tmp_path / "shards")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").Manager().dict()
    mp.start_processes(worker, args=(port, str(tmp_path / "shards"), results), nprocs=2, start_method="spawn")
    assert single["eval/samples"] == 40.0
    assert results[0] == results[1]  # every rank gets the same numbers
    assert results[0].keys() == single.keys()
    for key, value in single.items():
        assert results[0][key] == pytest.approx(value, abs=1e-4), key
    assert any(k.startswith("eval/zeroshot/audio") for k in single) and any("image_to_text" in k for k in single)
