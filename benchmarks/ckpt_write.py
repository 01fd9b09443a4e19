"""How long a checkpoint write takes: the size of MIM-Refiner's resume state for the paper's models and the
measured write rate of `common.save_checkpoint` (torch.save + fsync + rename) into a folder.

The state sizes are counted on meta tensors from mim_refiner.py's own modules (refinement stage: EMA encoder,
online encoder, ID heads, queues, AdamW moments of the trainable parameters); the rate is measured on a
synthetic state of --gb GB in --dir (use the cluster's output file system: a local disk and a parallel file
system differ by an order of magnitude). The write must fit inside SLURM's warning window (--signal=B:USR1@T)
and, as a time-based save, cost under longrun.SAVE_COST of the run.

    python benchmarks/ckpt_write.py --dir runs/ckpt_bench --gb 2
"""
import argparse
import os
import shutil
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import common  # noqa: E402
import longrun  # noqa: E402
import mim_refiner  # noqa: E402


def state_bytes(model: str) -> dict:
    """Bytes of each part of mim_refiner.py's checkpoint-last.pth in the refinement stage (fp32 throughout)."""
    args = mim_refiner.resolve_args(mim_refiner.Args(model=model), post_norm=False)
    with torch.device("meta"):
        encoder, refiner, queues = mim_refiner.build_modules(args, False, False)
    mim_refiner.set_trainable(encoder, "refine", args.freeze_blocks)
    size = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    enc = size(list(encoder.parameters()) + list(encoder.buffers()))
    trainable = [p for p in refiner.parameters() if p.requires_grad]
    return {"online encoder": enc, "EMA encoder": enc, "heads": size(refiner.heads.parameters()),
            "queues": size(queues.buffers()), "AdamW moments": 2 * size(trainable)}


def write_rate(folder: str, gb: float, repeats: int) -> tuple[float, float]:
    """(best, median) GB/s of common.save_checkpoint on a state of `gb` GB of 256 MB fp32 tensors."""
    chunk = 64 * 2**20  # floats per tensor (256 MB)
    state = {"model": {f"t{i}": torch.randn(chunk) for i in range(max(1, round(gb * 1e9 / (4 * chunk))))}}
    total = sum(t.numel() * 4 for t in state["model"].values()) / 1e9
    os.makedirs(folder, exist_ok=True)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        common.save_checkpoint(os.path.join(folder, "checkpoint-bench.pth"), state)
        times.append(time.perf_counter() - t0)
    shutil.rmtree(folder, ignore_errors=True)
    times.sort()
    return total / times[0], total / times[len(times) // 2]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="runs/ckpt_bench", help="folder to write into (removed afterwards)")
    p.add_argument("--gb", type=float, default=2.0, help="size of the synthetic state written")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", nargs="+", default=["vit_h14", "vit_2b14"])
    a = p.parse_args()
    best, median = write_rate(a.dir, a.gb, a.repeats)
    print(f"write rate into {a.dir}: {median:.2f} GB/s median, {best:.2f} GB/s best ({a.repeats} writes of {a.gb} GB, "
          f"torch.save + fsync + rename)")
    print("| model | online | EMA | heads | queues | AdamW | state GB | write s at the median rate | "
          f"interval for <{longrun.SAVE_COST:.0%} cost (min) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in a.models:
        parts = state_bytes(m)
        total = sum(parts.values()) / 1e9
        cells = " | ".join(f"{v / 1e9:.2f}" for v in parts.values())
        write_s = total / median
        print(f"| {m} | {cells} | {total:.1f} | {write_s:.0f} | {write_s / longrun.SAVE_COST / 60:.1f} |")


if __name__ == "__main__":
    main()
