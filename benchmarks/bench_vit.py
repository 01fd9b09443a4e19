"""Forward+backward throughput of our ViT (common.py) against timm's VisionTransformer, same config,
same weights, same inputs, measured in the same run with interleaved rounds (so machine load affects
both alike). Prints a Markdown table and the ratio ours/timm.

    python benchmarks/bench_vit.py                       # CPU: vit_t16 @32/4 and vit_b16 @224/16
    python benchmarks/bench_vit.py --device cuda --models vit_b16 vit_h14 --img-size 224 --batch-size 64
"""
import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def timm_twin(m):
    from timm.models.vision_transformer import VisionTransformer
    t = VisionTransformer(img_size=m.img_size, patch_size=m.patch_size, embed_dim=m.dim, depth=m.depth,
                          num_heads=m.num_heads, num_classes=0, qkv_bias=True,
                          norm_layer=functools.partial(nn.LayerNorm, eps=1e-6))
    t.load_state_dict(m.state_dict(), strict=True)
    return t


def step_time(model, x, device):
    with common.autocast(device):
        out = model.forward_features(x)
    out.float().square().mean().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(name, img, patch, batch, rounds, iters, device):
    torch.manual_seed(0)
    ours = common.create_vit(name, img_size=img, patch_size=patch).to(device)
    ref = timm_twin(ours).to(device)
    x = torch.randn(batch, 3, img, img, device=device)
    times = {"ours": [], "timm": []}
    for m in (ours, ref):  # warm-up
        step_time(m, x, device)
    for _ in range(rounds):
        for key, m in (("ours", ours), ("timm", ref)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(iters):
                step_time(m, x, device)
            times[key].append((time.perf_counter() - t0) / iters)
    ips = {k: batch / statistics.median(v) for k, v in times.items()}
    return ips["ours"], ips["timm"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=None, help="default: vit_t16 and vit_b16 on CPU, vit_b16 vit_h14 on CUDA")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--patch-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--rounds", type=int, default=5, help="interleaved measurement rounds (median taken)")
    p.add_argument("--iters", type=int, default=3, help="steps per round")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--min-ratio", type=float, default=None, help="exit 1 if any ours/timm ratio is below this")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if a.models is None:
        configs = [("vit_t16", 32, 4, 32), ("vit_b16", 224, 16, 8)] if device.type == "cpu" else \
                  [("vit_b16", 224, 16, 128), ("vit_h14", 224, 14, 32)]
    else:
        configs = [(m, a.img_size or (32 if device.type == "cpu" else 224), a.patch_size, a.batch_size or 32) for m in a.models]
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"device: {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} CPU threads'}), "
          f"torch {torch.__version__}, {'bf16 autocast' if device.type == 'cuda' else 'fp32'}, fwd+bwd of forward_features")
    print("| model | img | patch | batch | ours img/s | timm img/s | ratio |")
    print("|---|---|---|---|---|---|---|")
    worst = float("inf")
    for name, img, patch, batch in configs:
        patch = patch or common.VIT_CONFIGS[name][3]
        o, t = bench(name, img, patch, batch, a.rounds, a.iters, device)
        worst = min(worst, o / t)
        print(f"| {name} | {img} | {patch} | {batch} | {o:.1f} | {t:.1f} | {o / t:.3f} |", flush=True)
    if a.min_ratio is not None and worst < a.min_ratio:
        print(f"ratio {worst:.3f} below {a.min_ratio}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
