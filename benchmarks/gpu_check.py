"""One-GPU check of the CUDA path and of the memory plan, in about 3 minutes on one H100/H200 (4 on an A100):

    python benchmarks/gpu_check.py            # prints one table; without CUDA one line, exit 0

What it runs (each part in its own process, so that allocator settings and CUDA state do not leak):
1. The user's step: MIM-Refiner ViT-H/14 at its per-GPU share of the paper batch on 4 GPUs (128 images x (2 + 10)
   views, paper heads and queues, EMA, fused AdamW, bf16 autocast, flash attention forced with
   torch.nn.attention.sdpa_kernel) with the number k of checkpointed blocks of the `--plan 4x80` plan, inside a
   1-rank nccl DDP wrapper (its gradient buckets and communicator are part of the memory): 2 warm-up and 3 timed
   updates, once with expandable segments (the scripts' default) and once with the allocator's default. Printed:
   the plan's raw fake-tensor peak (no margin); max_memory_allocated / raw peak; max_memory_reserved / allocated;
   device memory used after the steps (total - free: the caching allocator keeps its peak reservation, plus the
   CUDA context, NCCL and kernels); the slack of that figure against the plan's need; step time, images/s, MFU
   from the model FLOPs (3 F: forward + backward) against the card's dense bf16 peak and HFU with the recomputed
   forward of the checkpointed blocks (3 F + F_ckpt).
2. The same step with the allocator capped (torch.cuda.set_per_process_memory_fraction) at what an A100-80GB leaves
   the allocator (its reported capacity, memplan.CARD_USABLE x 80 GiB, less this card's context/NCCL/kernel
   overhead), on a larger card only: fits or out of memory.
3. A world-1 FSDP2 run of mim_refiner.py through stage "heads" (encoder frozen) into stage "refine" on CUDA with the
   scripts' FSDP policy (fp32 parameters gathered, bf16 autocast), then its checkpoint loaded by plain torch.load
   in a process that sees no GPU: ok or the error line.
4. The tiny MIM-Refiner step-0 loss on CUDA (bf16) against the CPU fp32 value stored in
   benchmarks/gpu_check_reference.json (written by `python benchmarks/gpu_check.py --write-reference` on a CPU;
   tests/test_plan.py checks it is reproducible). Tolerance 1 % relative: the views, heads, queues and top-1
   lookups are the same (drawn on the CPU); bf16 matmuls move the loss by about 0.1 % (CPU bf16 vs fp32).

Time estimate (the arithmetic): F = the matmul FLOPs of one image's 12 views through ViT-H/14 (per block 24 T D^2
+ 4 T^2 D with T = 257 global and 50 local tokens, D = 1280, 32 blocks) = 1.30 TFLOP; an update of 128 images at k =
26 costs 128 x (3 + 26/32) x 1.30 = 0.64 PFLOP, i.e. 1.4 s at 45 % of an H100/H200's 989 TFLOPS (4.6 s on an
A100's 312). Part 1 runs 2 x 5 updates and part 2 3: 13 updates = 20 s (60 s on an A100); building ViT-H and
its EMA on the GPU 3 x ~10 s; the 4x80 plan on fake tensors ~25 s (CPU); part 3 ~30 s; part 4 ~15 s; Python and
CUDA start-ups ~30 s. No cold torch.compile of a large model (minutes).
"""
import argparse
import contextlib
import functools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

PEAK_BF16 = {"A100": 312, "H100": 989, "H200": 989, "L40S": 362, "A10": 125}  # dense bf16 TFLOPS
REFERENCE = ROOT / "benchmarks" / "gpu_check_reference.json"
USER_MODEL, USER_GPUS, A100_GB = "vit_h14", 4, 80
TINY_REFINER = ["--model", "vit_t16", "--img-size", "32", "--patch-size", "8", "--data", "synthetic:64:16",
                "--batch-size", "16", "--queue-size", "64", "--local-crops", "2", "--head-hidden", "64",
                "--pred-hidden", "64", "--head-blocks", "10", "11", "--topk", "1", "--head-topk", "1",
                "--warmup-epochs", "1", "--blr", "1e-3", "--head-blr", "1e-3", "--num-workers", "0", "--knn-every", "0",
                "--save-every", "0"]
REL_TOLERANCE = 0.01


def view_flops(tokens: int, dim: int, depth: int) -> float:
    """Matmul FLOPs of one view through the encoder (2 per multiply-add): qkv 6, proj 2, MLP 16 T D^2; QK^T, AV."""
    return depth * (24 * tokens * dim ** 2 + 4 * tokens ** 2 * dim)


def user_args():
    import mim_refiner as mr
    return mr.resolve_args(mr.Args(model=USER_MODEL), post_norm=False)


def user_plan():
    """The 4x80 plan of the user's command and its raw measurement at the plan's k (fake tensors, CPU)."""
    import common
    import memplan
    import mim_refiner as mr
    args = user_args()
    gpus, cap = memplan.parse_plan(f"{USER_GPUS}x{A100_GB}")
    plan = mr.memory_plan(args, False, gpus, cap, "auto")
    return args, plan


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_rank_group(device: torch.device):
    """A 1-rank process group (nccl on CUDA, gloo on CPU), as torchrun --nproc_per_node=1 would give."""
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def measure_step(args, n: int, k: int, device: torch.device, cap_bytes: float | None = None, warmup: int = 2,
                 iters: int = 3) -> dict:
    """The refinement update of mim_refiner.py (n images per GPU, k checkpointed blocks) in a 1-rank DDP wrapper;
    on CUDA with flash attention forced. Returns times and memory figures (or {"oom": message})."""
    import torch.nn as nn
    import common
    import mim_refiner as mr
    one_rank_group(device)
    if cap_bytes is not None:
        torch.cuda.set_per_process_memory_fraction(cap_bytes / torch.cuda.get_device_properties(device).total_memory)
    ddp = functools.partial(nn.parallel.DistributedDataParallel, device_ids=[device.index] if device.type == "cuda" else None,
                            gradient_as_bucket_view=True)
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        kernel = functools.partial(sdpa_kernel, SDPBackend.FLASH_ATTENTION)
    else:
        kernel = contextlib.nullcontext
    try:
        _, _, step, _ = mr.plan_builder(args, False, n, device, wrap=ddp)(k)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with kernel():
            for _ in range(warmup):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.time()
            for _ in range(iters):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        secs = (time.time() - t0) / iters
    except torch.cuda.OutOfMemoryError as e:
        return {"oom": str(e).splitlines()[0][:160]}
    out = {"step_s": secs, "images_s": n / secs}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        out.update(allocated=torch.cuda.max_memory_allocated(device), reserved=torch.cuda.max_memory_reserved(device),
                   used=total - free, total=total)
    return out


def part_step(a) -> dict:
    """Part 1 or 2 in this process (the parent set the allocator's environment)."""
    args = user_args()
    n = args.batch_size // USER_GPUS
    cap = None
    if a.cap:
        import memplan
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        torch.empty(1, device=device)  # the CUDA context
        free, total = torch.cuda.mem_get_info(device)
        overhead = total - free + memplan.NCCL_BYTES + memplan.KERNEL_BYTES  # context now; NCCL and kernels to come
        cap = memplan.CARD_USABLE * A100_GB * memplan.GiB - overhead
    return measure_step(args, n, a.k, torch.device("cuda", 0), cap_bytes=cap, iters=1 if a.cap else 3)


def run_part(flags, env=None, timeout=300) -> dict:
    p = subprocess.run([sys.executable, __file__, *flags], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})}, cwd=ROOT)
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"error": (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1][:200]}
    return json.loads(lines[-1])


def fsdp_check(tmp: Path, init: Path) -> str:
    """Part 3: torchrun x1 --fsdp through both stages on CUDA, then the checkpoint read without a GPU."""
    out = tmp / "fsdp"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                        str(ROOT / "mim_refiner.py"), *TINY_REFINER, "--init", str(init), "--head-epochs", "1",
                        "--epochs", "1", "--fsdp", "--device", "cuda", "--output-dir", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    if p.returncode != 0:
        err = [x for x in p.stderr.splitlines() if "Error" in x or "error:" in x]
        return "FAIL: " + ((err or p.stderr.strip().splitlines() or ["?"])[-1][:200])
    q = subprocess.run([sys.executable, "-c", f"import torch; s = torch.load({str(out / 'checkpoint-last.pth')!r}, "
                        f"weights_only=True); print(s['stage'], s['epoch'])"],
                       capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    if q.returncode != 0:
        return "FAIL: the checkpoint does not load without a GPU: " + q.stderr.strip().splitlines()[-1][:160]
    return f"ok (stage 'heads' -> 'refine', checkpoint {q.stdout.strip()} loads without a GPU)"


def tiny_loss(device: str, tmp: Path, init: Path) -> float:
    """Step-0 loss of the tiny MIM-Refiner run (1 update, the fixed init file) on `device`."""
    out = tmp / f"tiny_{device}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MIMREF_CUDA_DTYPES": "0"}
    p = subprocess.run([sys.executable, str(ROOT / "mim_refiner.py"), *TINY_REFINER, "--init", str(init),
                        "--head-epochs", "0", "--epochs", "1", "--device", device, "--output-dir", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    if p.returncode != 0:
        raise RuntimeError(p.stderr.strip().splitlines()[-1])
    return next(json.loads(x)["train/loss"] for x in open(out / "log.jsonl") if "train/loss" in x)


def write_init(path: Path):
    import common
    torch.manual_seed(0)
    torch.save({"model": common.create_vit("vit_t16", img_size=32, patch_size=8).state_dict()}, path)


def write_reference() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_init(tmp / "init.pth")
        loss = tiny_loss("cpu", tmp, tmp / "init.pth")
    REFERENCE.write_text(json.dumps({"what": "mim_refiner.py step-0 loss, CPU fp32", "flags": TINY_REFINER,
                                     "init": "common.create_vit('vit_t16', img_size=32, patch_size=8) after "
                                             "torch.manual_seed(0)", "loss": loss}, indent=2) + "\n")
    print(f"wrote {REFERENCE}: loss {loss:.6f}")
    return 0


def gib(x) -> str:
    return f"{x / 2**30:.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of this GPU (default: by name)")
    ap.add_argument("--write-reference", action="store_true", help="write the CPU fp32 reference loss (on a CPU)")
    ap.add_argument("--part", choices=["step"], default=None, help=argparse.SUPPRESS)  # a child process
    ap.add_argument("--k", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--cap", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.write_reference:
        return write_reference()
    if a.part == "step":
        print(json.dumps(part_step(a)), flush=True)
        return 0
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; nothing measured")
        return 0
    import common
    import memplan
    name = torch.cuda.get_device_name()
    total = torch.cuda.get_device_properties(0).total_memory
    peak = a.peak_tflops or next((v for k, v in PEAK_BF16.items() if k in name), float("nan"))
    print(f"| {name} | {gib(total)} GiB reported | dense bf16 peak {peak} TFLOPS | torch {torch.__version__} |\n|---|---|---|---|")

    args, plan = user_plan()
    n, k = args.batch_size // USER_GPUS, plan.checkpointed
    raw = plan.terms["raw"]  # the fake peak of one GPU's step (+ the DDP bucket copy the plan counts on 4 GPUs)
    print(f"\n{plan.line()}\n")
    dim, depth, _, patch = common.VIT_CONFIGS[USER_MODEL]
    g, l = 1 + (args.img_size // patch) ** 2, 1 + (args.local_size // patch) ** 2
    f_img = 2 * view_flops(g, dim, depth) + args.local_crops * view_flops(l, dim, depth)  # forward FLOPs per image
    print("| allocator | step s | images/s | MFU (3F) | HFU (3F + recompute) | max allocated / plan raw | "
          "reserved / allocated | device used | slack vs plan need |\n|---|---|---|---|---|---|---|---|---|")
    for label, conf in (("expandable segments", "expandable_segments:True"), ("default", "expandable_segments:False")):
        r = run_part(["--part", "step", "--k", str(k)], env={"PYTORCH_CUDA_ALLOC_CONF": conf})
        if "error" in r or "oom" in r:
            print(f"| {label} | {r.get('error') or 'out of memory: ' + r['oom']} | | | | | | | |")
            continue
        mfu = 3 * f_img * r["images_s"] / (peak * 1e12)
        hfu = (3 + k / depth) * f_img * r["images_s"] / (peak * 1e12)
        print(f"| {label} | {r['step_s']:.2f} | {r['images_s']:.1f} | {100 * mfu:.1f} % | {100 * hfu:.1f} % | "
              f"{gib(r['allocated'])} / {gib(raw)} = {r['allocated'] / raw:.3f} | {r['reserved'] / r['allocated']:.3f} | "
              f"{gib(r['used'])} GiB | {gib(plan.need - r['used'])} GiB |", flush=True)
    if total > 1.05 * memplan.CARD_USABLE * A100_GB * memplan.GiB:
        r = run_part(["--part", "step", "--k", str(k), "--cap"])
        verdict = (r.get("error") or (f"out of memory: {r['oom']}" if "oom" in r else
                   f"fits (max allocated {gib(r['allocated'])} GiB)"))
        print(f"\nthe same step capped at an A100-80GB's usable memory: {verdict}")
    else:
        print("\ncapped run: skipped (this card is not larger than an A100-80GB)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_init(tmp / "init.pth")
        print(f"world-1 FSDP2, stage 'heads' -> 'refine' on CUDA: {fsdp_check(tmp, tmp / 'init.pth')}")
        ref = json.loads(REFERENCE.read_text())["loss"]
        try:
            cu = tiny_loss("cuda", tmp, tmp / "init.pth")
            d = abs(cu - ref) / abs(ref)
            verdict = f"{cu:.5f} vs CPU fp32 {ref:.5f}: {100 * d:.2f} % ({'ok' if d <= REL_TOLERANCE else 'FAIL'}, " \
                      f"tolerance {100 * REL_TOLERANCE:.0f} %)"
        except RuntimeError as e:
            verdict = f"FAIL: {e}"
        print(f"tiny MIM-Refiner step-0 loss on CUDA bf16: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
