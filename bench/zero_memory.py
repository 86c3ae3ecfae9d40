"""Per-rank model + optimizer state at ZeRO 0/1/2/3, measured, against the ZeRO paper's per-parameter formula.

    .venv/bin/python bench/zero_memory.py [--nproc 2] [--flavor tiny] [--stages 0,1,2,3] [--out bench/_work/zero_memory]

For each stage, ``--nproc`` CPU ranks (gloo, fp32) build the pretrain model of ``--flavor`` with every objective on,
wrap it with mmfuse's DeepSpeed engine (``pretrain.engine.Engine``: the generated config, AdamW), run one
optimizer step (so Adam's moments exist), then a second forward + backward, and count on each rank the bytes of
every distinct tensor storage the engine holds, at that point (gradients present, before the step):

- walked from the engine: the module's parameters (ZeRO-3: their ``ds_tensor`` partitions), their ``.grad``, the
  optimizer object's attributes (ZeRO's flat groups, partitions, gradient partitions, buffers) and its ``state``;
- each storage counted once (parameters that are views into a flat buffer count with the buffer), sorted into
  param / grad / master (fp32 copies of the parameters) / adam (exp_avg, exp_avg_sq) / buffers (the rest:
  reduction buckets and the like) by where the walk met it first.

Predicted, fp32 on CPU (Ψ = trainable parameters, N = ranks; 4 bytes for the parameter, 4 for its gradient, 8 for
Adam's two moments; fp32 training needs no master copy): stage 0 16Ψ, stage 1 4Ψ + 4Ψ + 8Ψ/N, stage 2
4Ψ + 12Ψ/N, stage 3 16Ψ/N. The paper's mixed-precision figures (bf16/fp16 parameter and gradient, fp32 master +
moments, K = 12) are printed beside them for the GPU case: 16Ψ, 4Ψ + 12Ψ/N, 2Ψ + 14Ψ/N, 16Ψ/N.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def predicted_fp32(stage: int, psi: int, n: int) -> float:
    return {0: 16 * psi, 1: 8 * psi + 8 * psi / n, 2: 4 * psi + 12 * psi / n, 3: 16 * psi / n}[stage]


def predicted_mixed(stage: int, psi: int, n: int) -> float:
    return {0: 16 * psi, 1: 4 * psi + 12 * psi / n, 2: 2 * psi + 14 * psi / n, 3: 16 * psi / n}[stage]


CATEGORIES = ("param", "grad", "master", "adam", "buffers")


# ---- one rank ----
def held_storages(engine) -> dict[str, int]:
    """Bytes per category of the distinct tensor storages reachable from the engine's module and optimizer."""
    import torch

    seen: set[int] = set()
    totals = {"param": 0, "grad": 0, "master": 0, "adam": 0, "buffers": 0}
    where: dict[str, list] = {}  # path -> [category, bytes, storages]: the breakdown behind the totals

    def count(tensor, category: str, path: str = "module") -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in seen:
            return
        seen.add(storage.data_ptr())
        totals[category] += storage.nbytes()
        entry = where.setdefault(path, [category, 0, 0])
        entry[1] += storage.nbytes()
        entry[2] += 1

    for param in engine.module.parameters():  # first: a flat buffer that parameters view counts as "param"
        count(getattr(param, "ds_tensor", None), "param", "module.param.ds_tensor")  # ZeRO-3: this rank's partition
        count(param.data, "param", "module.param")
    for param in engine.module.parameters():
        count(param.grad, "grad", "module.param.grad")

    def category_of(path: str) -> str:
        lowered = path.lower()
        if "exp_avg" in lowered:
            return "adam"
        if "grad" in lowered:
            return "grad"
        # The inner optimizer's parameters: ZeRO's fp32 partitions (stage 0: the model's own, counted above).
        if "fp32" in lowered or "master" in lowered or "param_groups" in lowered:
            return "master"
        if "16" in lowered and "flat" in lowered:  # the (here fp32) parameter groups flattened by ZeRO
            return "param"
        return "buffers"

    visited: set[int] = set()

    def walk(obj, path: str, depth: int) -> None:
        if depth > 8 or id(obj) in visited:
            return
        visited.add(id(obj))
        if isinstance(obj, torch.Tensor):
            count(obj, category_of(path), path)
            if obj.grad is not None:
                count(obj.grad, "grad", path + ".grad")
            return
        if isinstance(obj, torch.nn.Module):
            return  # the model was counted above; other modules are not optimizer state
        if isinstance(obj, dict):
            for key, value in obj.items():
                walk(value, f"{path}.{key}" if isinstance(key, str) else path, depth + 1)
        elif isinstance(obj, (list, tuple, set)):
            for value in obj:
                walk(value, path, depth + 1)
        elif type(obj).__module__.startswith(("deepspeed", "torch.optim")) and hasattr(obj, "__dict__"):
            for key, value in vars(obj).items():
                walk(value, f"{path}.{key}", depth + 1)

    walk(engine.optimizer, "optimizer", 0)
    return {**totals, "where": where}


def synthetic_batch(model_cfg, batch: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    text = torch.zeros(batch, model_cfg.text.context_length, dtype=torch.long)
    text[:, 0], text[:, 1:7], text[:, 7] = 49406, torch.randint(1, 1000, (batch, 6), generator=g), 49407
    size = model_cfg.image.image_size
    ones = torch.ones(batch, dtype=torch.bool)
    return {"image": torch.randn(batch, 3, size, size, generator=g), "text": text,
            "audio": torch.randn(batch, model_cfg.audio.n_mels, model_cfg.audio.frames, generator=g) - 8,
            "has_image": ones, "has_text": ones, "has_audio": ones, "__key__": [str(i) for i in range(batch)]}


def rank_main(stage: int, flavor: str, out: Path) -> None:
    import torch

    from mmfuse.config import load_config
    from pretrain.config import PRESETS, PretrainConfig
    from pretrain.engine import Engine, init_distributed
    from pretrain.model import MultimodalModel
    from pretrain.objectives import DistContext, build_objectives
    from pretrain.step import PretrainStep

    topo = init_distributed()
    cfg = load_config(PretrainConfig, [str(ROOT / "configs/pretrain/tiny.yaml")], [
        f"model.flavor={flavor}", f"engine.zero_stage={stage}", "run.dir=unused", "data.train=unused",
        "data.batch_size=2", "engine.precision=fp32"], presets=PRESETS)
    torch.manual_seed(0)
    model = MultimodalModel(cfg.model)
    psi = sum(p.numel() for p in model.parameters() if p.requires_grad)
    objectives = build_objectives(cfg.objectives)
    weights = {o.name: getattr(cfg.objectives, o.name).weight for o in objectives}  # every objective of tiny.yaml
    step = PretrainStep(model, objectives, DistContext(topo.rank, topo.world_size), weights)
    engine = Engine(step, cfg, topo.world_size, external=model.loose_parameters())
    batch = synthetic_batch(cfg.model, cfg.data.batch_size)
    for i in range(2):
        losses = engine(batch)
        engine.backward(step.total(losses))
        if i == 1:
            held = held_storages(engine.ds_engine)
        engine.step()
    (out / f"stage{stage}_rank{topo.rank}.json").write_text(json.dumps({"psi": psi, **held}))
    torch.distributed.destroy_process_group()


# ---- the driver ----
def run_stage(stage: int, args, out: Path) -> list[dict]:
    from mmfuse.launch import free_port

    port, procs = free_port(), []
    for rank in range(args.nproc):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(args.nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, __file__, "--rank-of-stage", str(stage), "--flavor", args.flavor,
                                       "--out", str(out)], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                      stderr=open(out / f"stage{stage}_rank{rank}.log", "w")))
    if any(p.wait(timeout=args.timeout) for p in procs):
        raise RuntimeError(f"stage {stage} failed: see {out}/stage{stage}_rank*.log")
    return [json.loads((out / f"stage{stage}_rank{r}.json").read_text()) for r in range(args.nproc)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--flavor", default="tiny")
    p.add_argument("--stages", default="0,1,2,3")
    p.add_argument("--timeout", type=int, default=600)
    p.add_argument("--out", default=str(ROOT / "bench" / "_work" / "zero_memory"))
    p.add_argument("--rank-of-stage", type=int, default=-1, help=argparse.SUPPRESS)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.rank_of_stage >= 0:
        rank_main(args.rank_of_stage, args.flavor, out)
        return
    mib = 2**20
    lines = [f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, flavor {args.flavor}, "
             f"{args.nproc} CPU processes (gloo), fp32, AdamW; per-rank MiB, the largest rank",
             "", "| stage | param | grad | master | adam | buffers | measured | predicted fp32 | measured / predicted "
             "| without buffers / predicted | paper mixed precision |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for stage in map(int, args.stages.split(",")):
        ranks = run_stage(stage, args, out)
        worst = max(ranks, key=lambda r: sum(r[k] for k in CATEGORIES))
        psi, n = worst["psi"], args.nproc
        measured = sum(worst[k] for k in CATEGORIES)
        core = measured - worst["buffers"]
        fp32, mixed = predicted_fp32(stage, psi, n), predicted_mixed(stage, psi, n)
        print(json.dumps({"stage": stage, "ranks": [{k: v for k, v in r.items() if k != "where"} for r in ranks]}), flush=True)
        lines.append(f"| {stage} | " + " | ".join(f"{worst[k] / mib:.1f}" for k in ("param", "grad", "master", "adam", "buffers"))
                     + f" | {measured / mib:.1f} | {fp32 / mib:.1f} | {measured / fp32:.2f} | {core / fp32:.2f} | {mixed / mib:.1f} |")
    lines.append(f"\nΨ = {psi:,} trainable parameters ({4 * psi / mib:.1f} MiB in fp32)")
    table = "\n".join(lines)
    print(table)
    (out / "table.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
