"""Per-GPU memory of every method at its paper batch on 4 GPUs (ViT-L/16, ViT-H/14, ViT-2B/14), from a formula,
and the flags that make it fit a 40 GB or 80 GB A100. Calculated: a cross-check only; the measured figures are
each script's `--plan GPUSxGB` (benchmarks/mem_plan.py, docs/memory.md, which states the differences).

Parameter counts are exact: each method's own modules (encoder, decoder, heads, EMA/momentum copies, queues,
frozen blocks) are built on the meta device. Per GPU, with micro-batch n = batch / 4 / accum images:

  static (DDP)   trainable params x 16 B (fp32 weight, grad, AdamW m and v) + frozen params x 4 B
                 + EMA/momentum copies x 4 B + bf16 copies of the trainable weights cached by autocast x 2 B
                 + queues (MIM-Refiner, MAE-CT: rows x (dim x 4 B + 16 B ids/labels))
  static (FSDP)  (trainable x 16 B + frozen x 4 B + EMA x 4 B) / 4 processes + queues + the unsharded working
                 set: 2 gathered blocks (bf16 weight 2 B + bf16 and fp32 grad 6 B) + root unit (heads) x 10 B
  activations    T tokens per stream (encoder views, decoder), width D, through the blocks that get a gradient
                 (frozen leading blocks save nothing). bf16 autocast, SDPA (flash: no N^2 term). Per token:
                 without --grad-checkpointing 38 B x D per block (fp32 residual in 4 + LN out 2 + q,k,v 6 +
                 attention out 2 + proj in 2 + residual 4 + LN out 2 + fc1 out 8 + GELU out 8);
                 with it 4 B x D per block (the fp32 block input that checkpoint keeps) + 38 B x D for the one
                 block recomputed in backward. Heads: 8 B x (sum of layer widths) per row (in/out of every
                 Linear/BN, fp32, conservative). MAE/LUT: pixel targets/predictions 12 B x p^2 x 3 per patch.
  total          (static + activations) x 1.1 (allocator fragmentation, CUDA context, transient buffers)

`--validate` measures the saved-tensor bytes of our ViT on CPU (fp32, torch.autograd.graph.saved_tensors_hooks)
and prints them next to the fp32 version of the per-block formula (68 B x D + 12 B x D of q, k, v copies that
CPU SDPA makes; bf16 halves every term but the two fp32 residual-stream tensors).

    python benchmarks/mem_estimate.py                 # the table (a few seconds)
    python benchmarks/mem_estimate.py --validate      # + the CPU check of the activation term
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

GB = 1e9
GPUS = 4
SLACK = 1.1
BLOCK_BF16 = 38  # bytes x D per token per block, bf16 autocast, no checkpointing (see docstring)
BLOCK_INPUT = 4  # bytes x D per token per checkpointed block (fp32 residual stream)
MODELS = ("vit_l16", "vit_h14", "vit_2b14")
FSDP_METHODS = ("mae", "mim_refiner")  # scripts that implement --fsdp
ACCUM_OK = ("mae", "lut", "conmim", "mim_refiner")  # mae_ct refuses --accum-steps > 1


def nparams(*modules, trainable=None):
    ps = [p for m in modules for p in m.parameters()]
    if trainable is not None:
        ps = [p for p in ps if p.requires_grad == trainable]
    return sum(p.numel() for p in ps)


def mlp_widths(seq) -> int:
    """Sum of the in/out widths of the Linear layers of a head (activations per row)."""
    lin = [m for m in seq.modules() if isinstance(m, torch.nn.Linear)]
    return lin[0].in_features + sum(m.out_features for m in lin)


def method_spec(method: str, model: str, img: int = 224) -> dict:
    """Everything the formula needs, from the method file's own modules (built on the meta device)."""
    dim, depth, heads, patch = common.VIT_CONFIGS[model]
    N = (img // patch) ** 2
    with torch.device("meta"):
        enc = common.create_vit(model, img_size=img)
        enc.pos_embed.requires_grad_(False)
        s = dict(dim=dim, depth=depth, patch=patch, streams=[], head_rows=0, head_width=0, queue_bytes=0,
                 ema=0, extra_per_img=0, root=0)
        if method == "mae":
            import mae
            a = mae.Args(model=model)
            dec = mae.MaeDecoder(dim, img // patch, patch, a.decoder_dim, a.decoder_depth, a.decoder_heads)
            s.update(batch=a.batch_size, trainable=nparams(enc, dec, trainable=True), frozen=nparams(enc, dec, trainable=False),
                     block=nparams(enc.blocks[0]))
            keep = int(N * (1 - a.mask_ratio))
            s["streams"] = [("encoder", 1 + keep, dim, depth), ("decoder", 1 + N, a.decoder_dim, a.decoder_depth)]
            s["extra_per_img"] = 12 * N * patch * patch * 3
        elif method == "mae_ct":
            import mae_ct
            a = mae_ct.resolve_args(mae_ct.Args(model=model))
            m = mae_ct.MaeCt(enc, a.pool, a.proj_hidden, a.proj_dim, a.pred_hidden)
            mae_ct.set_trainable(m, 2, a.frozen_blocks)
            s.update(batch=a.batch_size, trainable=nparams(m, trainable=True), frozen=nparams(m, trainable=False),
                     ema=nparams(enc) + nparams(m.projector), block=nparams(enc.blocks[0]))
            s["streams"] = [("encoder x2 views", 2 * (1 + N), dim, depth - a.frozen_blocks)]
            s["head_rows"], s["head_width"] = 2, mlp_widths(m.projector) + mlp_widths(m.predictor)
            s["queue_bytes"] = a.queue_size * (a.proj_dim * 4 + 16)
        elif method == "mim_refiner":
            import mim_refiner as mr
            a = mr.resolve_args(mr.Args(model=model), post_norm=False)
            m = mr.Refiner(enc, a.head_blocks, a.head_hidden, a.head_dim, a.pred_hidden)
            mr.set_trainable(enc, "refine", a.freeze_blocks)
            nl = (a.local_size // patch) ** 2
            s.update(batch=a.batch_size, trainable=nparams(m, trainable=True), frozen=nparams(m, trainable=False),
                     ema=nparams(enc), block=nparams(enc.blocks[0]), root=nparams(m.heads))
            s["streams"] = [(f"encoder 2x{img}+{a.local_crops}x{a.local_size}",
                             2 * (1 + N) + a.local_crops * (1 + nl), dim, depth - a.freeze_blocks)]
            s["head_rows"] = (2 + a.local_crops) * len(a.head_blocks)
            s["head_width"] = mlp_widths(m.heads[0].projector) + mlp_widths(m.heads[0].predictor)
            s["queue_bytes"] = len(a.head_blocks) * a.queue_size * (a.head_dim * 4 + 16)
        elif method == "lut":
            import lut
            a = lut.Args(model=model)
            online = lut.LUTOnline(enc, a)
            s.update(batch=a.batch_size, trainable=nparams(online, trainable=True), frozen=nparams(online, trainable=False),
                     ema=nparams(online.encoder) + nparams(online.head), block=nparams(enc.blocks[0]))
            keep = int(N * (1 - a.mask_ratio))
            s["streams"] = [("encoder", 1 + keep, dim, depth), ("decoder", 1 + N, a.decoder_dim, a.decoder_depth)]
            s["head_rows"], s["head_width"] = 1, mlp_widths(online.head) + mlp_widths(online.predictor)
            s["extra_per_img"] = 12 * N * patch * patch * 3
        elif method == "conmim":
            import conmim
            a = conmim.Args(model=model)
            online = conmim.ConMIMBranch(enc, conmim.Projector(dim, a.head_hidden_dim, a.head_out_dim))
            s.update(batch=a.batch_size, trainable=nparams(online, trainable=True), frozen=nparams(online, trainable=False),
                     ema=nparams(online), block=nparams(enc.blocks[0]))
            s["streams"] = [("encoder", 1 + N, dim, depth)]
            s["head_rows"], s["head_width"] = 1 + N, mlp_widths(online.head.mlp)  # projector on every token
        else:
            raise ValueError(method)
    return s


def estimate(s: dict, n: int, gc: bool, fsdp: bool) -> dict:
    """Bytes per GPU for micro-batch n (images per GPU per forward)."""
    if fsdp:
        static = (s["trainable"] * 16 + s["frozen"] * 4 + s["ema"] * 4) / GPUS + 2 * s["block"] * 8 + s["root"] * 10
    else:
        static = s["trainable"] * 16 + s["frozen"] * 4 + s["ema"] * 4 + s["trainable"] * 2
    static += s["queue_bytes"]
    act = 0.0
    recompute = 0.0
    for _, tok, d, blocks in s["streams"]:
        T = n * tok
        if gc:
            act += blocks * T * d * BLOCK_INPUT
            recompute = max(recompute, T * d * BLOCK_BF16)
        else:
            act += blocks * T * d * BLOCK_BF16
    act += recompute + n * s["head_rows"] * s["head_width"] * 8 + n * s["extra_per_img"]
    return dict(static=static, act=act, total=(static + act) * SLACK)


def fit_flags(method: str, s: dict, cap_gb: float) -> str:
    """The cheapest flag set that fits: MAE prefers no recompute, then no sharding, then the fewest accumulation
    steps (accumulation does not change its maths); the contrastive methods prefer no accumulation (it changes
    their BN batch and negatives), then no sharding, then no recompute."""
    accums = [1, 2, 4, 8, 16, 32] if method in ACCUM_OK else [1]
    fsdps = [False, True] if method in FSDP_METHODS else [False]
    if method == "mae":
        order = [(gc, f, k) for gc in (False, True) for f in fsdps for k in accums]
    else:
        order = [(gc, f, k) for k in accums for f in fsdps for gc in (False, True)]
    for gc, f, k in order:
        n = s["batch"] // GPUS // k
        if n < 1 or s["batch"] % (GPUS * k):
            continue
        e = estimate(s, n, gc, f)
        if e["total"] <= cap_gb * GB:
            flags = [x for x, on in (("--grad-checkpointing on", gc), ("--fsdp", f), (f"--accum-steps {k}", k > 1)) if on]
            return f"{' '.join(flags) or '(none)'}: {e['total'] / GB:.0f} GB"
    return "does not fit: 8 GPUs" + ("" if method in FSDP_METHODS else " (no --fsdp here)")


def validate():
    """Measured saved-tensor bytes of our ViT (CPU, fp32) vs the fp32 form of the per-block formula."""
    def saved(fn):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(seen.values())
    B, img, patch, D = 8, 32, 4, 192
    T = B * (1 + (img // patch) ** 2)
    x = torch.randn(B, 3, img, img)
    rows = []
    for gc in (False, True):
        per = []
        for depth in (2, 4):
            torch.manual_seed(0)
            enc = common.create_vit("vit_t16", img_size=img, patch_size=patch, depth=depth, grad_checkpointing=depth if gc else 0)
            per.append(saved(lambda: enc.forward_features(x)))
        measured = (per[1] - per[0]) / 2 / (T * D)  # bytes x D per token per block
        formula = 4 if gc else 68 + 12
        rows.append((gc, measured, formula))
    print("activation term, CPU fp32 (vit_t16 width, 8 x 65 tokens): bytes x D per token per block")
    print("| grad checkpointing | measured | formula (fp32) |")
    print("|---|---|---|")
    for gc, m, f in rows:
        print(f"| {'on' if gc else 'off'} | {m:.1f} | {f} |")
    print("fp32 formula: residual 4 + LN out 4 + q,k,v 12 + attention out 4 + proj in 4 + residual 4 + LN out 4 + fc1 out 16"
          " + GELU out 16 = 68, + 12 for the contiguous q,k,v copies CPU SDPA keeps; bf16 on CUDA: 38 (flash SDPA keeps"
          " the q,k,v views). With checkpointing only the fp32 block input (4) stays.\n")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--methods", nargs="+", default=["mae", "mae_ct", "mim_refiner", "lut", "conmim"])
    p.add_argument("--validate", action="store_true", help="also measure the activation term on CPU")
    a = p.parse_args(argv)
    if a.validate:
        validate()
    print(f"per-GPU memory at the paper's global batch on {GPUS} GPUs, bf16 autocast, 224 px, x{SLACK} slack "
          f"(GB = 1e9 B; calculated, not measured)")
    print("| method | model | batch (per GPU) | trainable / frozen / EMA params (M) | DDP | DDP + ckpt | FSDP + ckpt "
          "| fits 40 GB with | fits 80 GB with |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method in a.methods:
        for model in a.models:
            s = method_spec(method, model)
            n = s["batch"] // GPUS
            tot = {k: estimate(s, n, gc, f)["total"] / GB for k, gc, f in (("ddp", False, False), ("gc", True, False),
                                                                              ("fsdp", True, True))}
            fsdp = f"{tot['fsdp']:.0f}" if method in FSDP_METHODS else "n/a"
            print(f"| {method} | {model} | {s['batch']} ({n}) | {s['trainable'] / 1e6:.0f} / {s['frozen'] / 1e6:.0f} / "
                  f"{s['ema'] / 1e6:.0f} | {tot['ddp']:.0f} | {tot['gc']:.0f} | {fsdp} | {fit_flags(method, s, 40)} | "
                  f"{fit_flags(method, s, 80)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
