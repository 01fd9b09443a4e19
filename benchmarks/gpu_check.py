"""One-GPU check of the CUDA path and of the memory plan, in one command (about 8 minutes on an A100/H100):

    python benchmarks/gpu_check.py            # prints one table; without CUDA one line, exit 0

1. Every training script (mae, mae_ct, mim_refiner, lut, conmim) runs 4 updates of a small model (ViT-S/16 at 64 px,
   synthetic data, paper heads/decoders shrunk as in the tiny tests) on CUDA with bf16 autocast, SDPA, fused AdamW
   and --compile, and the same command on the CPU in fp32. Compared: the first logged loss (step 0, the same
   initial weights and the same CPU-side augmentations). Tolerance: 2 % relative for MAE-CT and MIM-Refiner (views
   drawn by the loader on the CPU, deterministic top-1 lookup: the same batch; bf16 matmuls with fp32 accumulation
   give ~0.3 % per layer, a few layers compound) and 10 % for MAE, LUT, ConMIM, whose masks are drawn on the
   device (a CUDA and a CPU generator give other masks: the same distribution, not the same batch).
2. The MIM-Refiner ViT-L/16 and ViT-H/14 training step (paper heads, 2 + 10 views, queues, EMA, AdamW) at the
   largest per-GPU batch the plan allows on this GPU (the 4-GPU paper batch, doubled while the plan fits), the
   checkpointed blocks the plan chooses: images/s, achieved TFLOPS, MFU, --compile on/off ratio and
   torch.cuda.max_memory_allocated against the plan's need (the margin that the plan adds is the ratio's slack).

FLOPs per image and update (matmuls only; 2 FLOPs per multiply-add; forward F, backward 2F, recomputation of the
checkpointed blocks' forward F_ckpt): for each view with T = 1 + (size/patch)^2 tokens, per block
24 T D^2 (qkv 6, proj 2, MLP 16) + 4 T^2 D (QK^T and AV), plus the heads' Linear layers per CLS row;
train FLOPs = 3 F + F_ckpt. TFLOPS = FLOPs x images/s; MFU = TFLOPS / the GPU's dense bf16 peak (A100 312,
H100 SXM 989, H200 989, L40S 362; other GPUs: --peak-tflops).
"""
import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

PEAK_BF16 = {"A100": 312, "H100": 989, "H200": 989, "L40S": 362, "A10": 125}
SMALL = ["--model", "vit_s16", "--img-size", "64", "--num-workers", "2", "--data", "synthetic:256:64"]
SCRIPTS = {  # script: (extra flags, tolerance)
    "mae.py": (["--batch-size", "64", "--epochs", "1", "--vis-images", "0", "--decoder-depth", "2"], 0.10),
    "mae_ct.py": (["--batch-size", "64", "--head-epochs", "0", "--epochs", "1", "--queue-size", "512", "--topk", "1",
                   "--init", "INIT"], 0.02),
    "mim_refiner.py": (["--batch-size", "64", "--head-epochs", "0", "--epochs", "1", "--queue-size", "512", "--topk", "1",
                        "--local-crops", "2", "--init", "INIT"], 0.02),
    "lut.py": (["--batch-size", "64", "--epochs", "1", "--log-every", "1"], 0.10),
    "conmim.py": (["--batch-size", "64", "--epochs", "1", "--log-every", "1"], 0.10),
}


def first_loss(script, flags, device, out):
    extra = ["--device", device] + (["--compile"] if device == "cuda" else [])
    p = subprocess.run([sys.executable, str(ROOT / script), *SMALL, *flags, *extra, "--output-dir", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if p.returncode != 0:
        return None, p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"
    rows = [json.loads(x) for x in open(out / "log.jsonl")]
    return next(r["train/loss"] for r in rows if "train/loss" in r), ""


def view_flops(tokens, dim, depth):
    return depth * (24 * tokens * dim ** 2 + 4 * tokens ** 2 * dim)


def refiner_row(model, peak_tflops, compile_):
    import common
    import mim_refiner as mr
    args = mr.resolve_args(mr.Args(model=model), post_norm=False)
    dev = torch.device("cuda")
    free = torch.cuda.mem_get_info()[0]
    n = args.batch_size // 4  # the paper batch on 4 GPUs; one process: batch_size = per-GPU batch
    plan = mr.memory_plan(dataclasses.replace(args, batch_size=n), False, 1, free, "auto")
    while plan.fits:
        bigger = mr.memory_plan(dataclasses.replace(args, batch_size=2 * n), False, 1, free, "auto")
        if not bigger.fits:
            break
        n, plan = 2 * n, bigger
    args = dataclasses.replace(args, batch_size=n)
    if not plan.fits:
        return f"| MIM-Refiner {model} | does not fit one GPU at {n} images: {plan.fix} |"
    dim, depth, _, patch = common.VIT_CONFIGS[model]
    g, l = 1 + (args.img_size // patch) ** 2, 1 + (args.local_size // patch) ** 2
    fwd = 2 * view_flops(g, dim, depth) + args.local_crops * view_flops(l, dim, depth)
    ck = plan.checkpointed / depth
    flops = (3 + ck) * fwd  # per image; heads are < 1 % at these widths
    res = {}
    for c in ([False, True] if compile_ else [False]):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        modules, optimizers, step, _ = mr.plan_builder(args, False, n, dev)(plan.checkpointed)
        if c:
            modules[0].features_fn = torch.compile(modules[0].features)
        amp = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
        for _ in range(3):  # warm-up (and compile)
            step(amp)
        torch.cuda.synchronize()
        t0, iters = time.time(), 5
        for _ in range(iters):
            step(amp)
        torch.cuda.synchronize()
        res[c] = (iters * n / (time.time() - t0), torch.cuda.max_memory_allocated())
        del modules, optimizers, step
    ips, mem = res[False]
    tflops = flops * ips / 1e12
    ratio = f"{res[True][0] / ips:.2f}" if True in res else "-"
    return (f"| MIM-Refiner {model} | {n} x 12 views, ckpt {plan.checkpointed}/{depth} | {ips:.1f} | {tflops:.0f} | "
            f"{100 * tflops / peak_tflops:.0f} % | {ratio} | {mem / 2**30:.1f} / {plan.need / 2**30:.1f} GiB |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of this GPU (default: by name)")
    ap.add_argument("--no-compile-ratio", action="store_true", help="skip the compiled ViT-L/H timing")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; nothing measured")
        return 0
    import tempfile
    import common
    name = torch.cuda.get_device_name()
    peak = a.peak_tflops or next((v for k, v in PEAK_BF16.items() if k in name), None)
    print(f"| {name} | bf16 peak {peak or '?'} TFLOPS |\n|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        torch.save({"model": common.create_vit("vit_s16", img_size=64).state_dict()}, tmp / "init.pth")
        print("| script | CUDA bf16 + compile loss | CPU fp32 loss | rel. diff | tolerance | ok |\n|---|---|---|---|---|---|")
        for script, (flags, tol) in SCRIPTS.items():
            flags = [str(tmp / "init.pth") if f == "INIT" else f for f in flags]
            cu, err1 = first_loss(script, flags, "cuda", tmp / f"{script}.cuda")
            cp, err2 = first_loss(script, flags, "cpu", tmp / f"{script}.cpu")
            if cu is None or cp is None:
                print(f"| {script} | {cu or err1} | {cp or err2} | - | {tol:.0%} | FAIL |")
                continue
            d = abs(cu - cp) / abs(cp)
            print(f"| {script} | {cu:.4f} | {cp:.4f} | {d:.2%} | {tol:.0%} | {'ok' if d <= tol else 'FAIL'} |")
    print("| step | per-GPU batch, plan | images/s | TFLOPS | MFU | compile speed-up | max allocated / plan |\n"
          "|---|---|---|---|---|---|---|")
    for model in ("vit_l16", "vit_h14"):
        print(refiner_row(model, peak or float("nan"), not a.no_compile_ratio), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
