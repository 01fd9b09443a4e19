"""Fine-tuning step throughput: finetune.py's step (mixup / cutmix with the batch's mirror, per-sample stochastic
depth, the classifier with mean pooling and fc_norm, soft-target cross-entropy, backward, fused AdamW over the
layer-decay groups) against timm's VisionTransformer(global_pool='avg', fc_norm=True, drop_path_rate) with timm's
Mixup and SoftTargetCrossEntropy doing the same forward, backward and AdamW step, on the same weights and images,
measured in the same run in interleaved rounds. Prints a Markdown table and the ratio ours / timm (images per
second; > 1: ours is faster).

    python benchmarks/bench_finetune.py                     # CPU: vit_t16 @ 32 / 8, vit_b16 @ 224 / 16
    python benchmarks/bench_finetune.py --device cuda --models vit_b16 vit_l16 --img-size 224 --batch-size 64
"""
import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import finetune  # noqa: E402

NUM_CLASSES, DROP_PATH = 1000, 0.1


def timm_twin(model: finetune.Classifier):
    from timm.models.vision_transformer import VisionTransformer
    e = model.encoder
    t = VisionTransformer(img_size=e.img_size, patch_size=e.patch_size, embed_dim=e.dim, depth=e.depth,
                          num_heads=e.num_heads, num_classes=NUM_CLASSES, global_pool="avg", fc_norm=True,
                          drop_path_rate=DROP_PATH, qkv_bias=True, norm_layer=functools.partial(nn.LayerNorm, eps=1e-6))
    t.load_state_dict(finetune.timm_state_dict(model), strict=True)
    return t


def steps(name, img, patch, batch, device):
    torch.manual_seed(0)
    ours = finetune.Classifier(common.create_vit(name, img, patch, drop_path_rate=DROP_PATH), NUM_CLASSES, "avg")
    ref = timm_twin(ours).to(device).train()
    ours.to(device).train()
    opt_ours = common.make_adamw(finetune.layer_decay_groups(ours, 0.05, 0.65), 1e-4, betas=(0.9, 0.999))
    opt_ref = torch.optim.AdamW(ref.parameters(), 1e-4, weight_decay=0.05, fused=True)
    x = torch.randn(batch, 3, img, img, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    info = common.DistInfo(device=device)
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    mixup, soft_ce = Mixup(0.8, 1.0, label_smoothing=0.1, num_classes=NUM_CLASSES), SoftTargetCrossEntropy()

    def step_ours(i):
        xm, t = finetune.mix_batch(x, y, np.random.RandomState(i), mixup=0.8, cutmix=1.0, smoothing=0.1,
                                   num_classes=NUM_CLASSES, partner=functools.partial(finetune.mirror, dist_info=info))
        keep = finetune.drop_path_keep(ours.drop_rates, batch, torch.Generator().manual_seed(i), info, device)
        with common.autocast(device):
            logits = ours(xm, keep)
        F.cross_entropy(logits.float(), t).backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_ref(i):
        np.random.seed(i)
        xm, t = mixup(x.clone(), y)
        with common.autocast(device):
            logits = ref(xm)
        soft_ce(logits.float(), t).backward()
        opt_ref.step()
        opt_ref.zero_grad(set_to_none=True)
    return step_ours, step_ref


def bench(name, img, patch, batch, rounds, iters, device):
    fns = dict(zip(("ours", "timm"), steps(name, img, patch, batch, device)))
    times = {k: [] for k in fns}
    for f in fns.values():  # warm-up
        f(0)
    for r in range(rounds):
        for k, f in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(iters):
                f(1 + r * iters + i)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[k].append((time.perf_counter() - t0) / iters)
    return {k: batch / statistics.median(v) for k, v in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=None)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--patch-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--rounds", type=int, default=5, help="interleaved measurement rounds (median taken)")
    p.add_argument("--iters", type=int, default=3, help="steps per round")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--min-ratio", type=float, default=None, help="exit 1 if any ours / timm ratio is below this")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if a.models is None:
        configs = [("vit_t16", 32, 8, 64), ("vit_b16", 224, 16, 8)] if device.type == "cpu" else \
                  [("vit_b16", 224, 16, 128), ("vit_l16", 224, 16, 64)]
    else:
        configs = [(m, a.img_size or 224, a.patch_size, a.batch_size or 32) for m in a.models]
    print(f"device: {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} CPU threads'}), "
          f"torch {torch.__version__}, {'bf16 autocast' if device.type == 'cuda' else 'fp32'}; one fine-tuning step: "
          f"mixup/cutmix, drop path {DROP_PATH}, {NUM_CLASSES} classes, forward, backward, fused AdamW")
    print("| model | img | patch | batch | ours img/s | timm img/s | ratio |")
    print("|---|---|---|---|---|---|---|")
    worst = float("inf")
    for name, img, patch, batch in configs:
        patch = patch or common.VIT_CONFIGS[name][3]
        ips = bench(name, img, patch, batch, a.rounds, a.iters, device)
        worst = min(worst, ips["ours"] / ips["timm"])
        print(f"| {name} | {img} | {patch} | {batch} | {ips['ours']:.1f} | {ips['timm']:.1f} | "
              f"{ips['ours'] / ips['timm']:.3f} |", flush=True)
    if a.min_ratio is not None and worst < a.min_ratio:
        print(f"ratio {worst:.3f} below {a.min_ratio}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
