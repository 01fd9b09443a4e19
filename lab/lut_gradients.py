"""Which loss drives LUT's encoder? Gradient norms of L_mim and L_bc on the online encoder, per checkpoint.

LUT (lut.py) trains one encoder with L = L_mim + lambda L_bc (Eq. 3). AdamW normalises every parameter's
step by its gradient's running RMS, so once one loss's gradient is much larger than the other's, that
loss sets the direction of the encoder's update whatever lambda is. This script measures, on one fixed
batch of LUT's two views and one fixed mask: L_mim and L_bc, |grad_enc L_mim| and |grad_enc lambda L_bc|
(L2 over all encoder parameters) and their ratio, and how alike the online predictions q and the momentum
targets k are across images (mean pairwise cosine; near 1 = one vector for every image). This is how the
LUT miniature was diagnosed (README "Miniature reproduction", lut.py docstring).

    python lut.py ... --output-dir runs/lut                      # or --exit-after-epochs N for earlier points
    python lab/lut_gradients.py runs/lut/checkpoint-last.pth --data synthetic:2000:500
    python lab/lut_gradients.py init --args-from runs/lut/checkpoint-last.pth    # the same model at step 0

The model, heads and flags come from the checkpoint's stored "args" ("init" builds the initial model of
--args-from, i.e. the seed's weights before any step). CPU, fp32, online model in train mode (batch-statistics
BN) and momentum branch as in training.
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import lut  # noqa: E402


def build(args: lut.Args, state=None):
    """The online model and momentum branch exactly as lut.main builds them (seeded), optionally loaded."""
    common.seed_everything(args.seed)
    encoder = common.create_vit(args.model, img_size=args.img_size, patch_size=args.patch_size)
    online = lut.LUTOnline(encoder, args)
    momentum = lut.MomentumBranch(online)
    if state is not None:
        lut.load_lut_state(online, momentum, state, common.DistInfo())
    return online, momentum


def mean_pairwise_cos(x: torch.Tensor) -> float:
    """(B, C) -> mean cosine over the B (B - 1) pairs of different rows."""
    xn = F.normalize(x.double(), dim=1)
    B = xn.shape[0]
    return float(((xn @ xn.T).sum() - B) / (B * (B - 1)))


def measure(args: lut.Args, online, momentum, weak, strong, seed: int) -> dict:
    online.train()
    momentum.eval()
    if args.momentum_bn == "batch":
        momentum.head.train()
    torch.manual_seed(seed)  # the same mask for every checkpoint
    num_patches = online.encoder.num_patches
    keep1, ids_restore, mask1, keep2 = lut.random_masking(weak.shape[0], num_patches, args.mask_ratio, weak.device,
                                                          args.symmetric)
    if args.symmetric:
        loss_mim, q1, q2 = online(weak, keep1, ids_restore, mask1, strong, keep2)
        k1, k2 = momentum(weak), momentum(strong)
        loss_bc = 0.5 * (lut.context_loss(q1, k2) + lut.context_loss(q2, k1))
        q, k = torch.cat([q1, q2]), torch.cat([k2, k1])
    else:
        loss_mim, q, _ = online(weak, keep1, ids_restore, mask1)
        k = momentum(strong)
        loss_bc = lut.context_loss(q, k)
    weight = args.context_weight if args.context_weight is not None else lut.default_context_weight(online.encoder.dim)
    params = [p for p in online.encoder.parameters() if p.requires_grad]
    norm = lambda gs: float(torch.sqrt(sum((g.double() ** 2).sum() for g in gs if g is not None)))  # noqa: E731
    g_mim = norm(torch.autograd.grad(args.mae_weight * loss_mim, params, retain_graph=True, allow_unused=True))
    g_bc = norm(torch.autograd.grad(weight * loss_bc, params, allow_unused=True))
    return {"loss_mim": loss_mim.item(), "loss_bc": loss_bc.item(), "context_weight": weight, "grad_mim": g_mim,
            "grad_bc": g_bc, "ratio": g_bc / max(g_mim, 1e-30), "cos_q": mean_pairwise_cos(q.detach()),
            "cos_k": mean_pairwise_cos(k)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoints", nargs="+", help="lut.py checkpoint files, or `init` (needs --args-from)")
    ap.add_argument("--args-from", default=None, help="checkpoint whose stored flags build `init` (default: the first file)")
    ap.add_argument("--data", default="synthetic:2000:500", help="as lut.py --data (the train split is used)")
    ap.add_argument("--batch", type=int, default=128, help="images in the measured batch (the miniature's batch)")
    ap.add_argument("--seed", type=int, default=0, help="selects the images, their augmentations and the mask")
    a = ap.parse_args(argv)
    files = [c for c in a.checkpoints if c != "init"]
    src = a.args_from or (files[0] if files else None)
    if src is None:
        raise SystemExit("error: `init` alone needs --args-from CHECKPOINT (the run whose flags build the model)")
    base = torch.load(src, map_location="cpu", weights_only=True).get("args")
    if base is None or "context_weight" not in base:
        raise SystemExit(f"error: {src} is not a lut.py checkpoint (no LUT args); pass one with --args-from")
    # one batch of the two views (shaped by the run's flags) for every checkpoint
    base_args = lut.Args(**base)
    ds = common.build_dataset(a.data, "train", lut.lut_transform(base_args), img_size=base_args.img_size,
                              seed=base_args.seed)
    common.seed_everything(a.seed)  # torch, numpy and random: the views' augmentations use all three
    pairs = [ds[i][0] for i in torch.randperm(len(ds))[:a.batch].tolist()]
    views = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    print("checkpoint | L_mim | L_bc | lambda | |grad L_mim| | |grad lambda L_bc| | ratio | cos(q) | cos(k)")
    print("---|---|---|---|---|---|---|---|---")
    for c in a.checkpoints:
        state = None if c == "init" else torch.load(c, map_location="cpu", weights_only=True)
        if state is not None and "predictor" not in state:
            raise SystemExit(f"error: {c} is not a lut.py checkpoint (no predictor); pass lut.py checkpoints or `init`")
        args = base_args if state is None else lut.Args(**state["args"])
        online, momentum = build(args, state)
        r = measure(args, online, momentum, *views, seed=a.seed)
        print(f"{c} | {r['loss_mim']:.3f} | {r['loss_bc']:.3f} | {r['context_weight']:g} | {r['grad_mim']:.2e} | "
              f"{r['grad_bc']:.2e} | {r['ratio']:.2f} | {r['cos_q']:.2f} | {r['cos_k']:.2f}")


if __name__ == "__main__":
    main()
