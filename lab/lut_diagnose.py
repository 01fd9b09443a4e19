"""Why does LUT's encoder collapse in the miniature? An instrumented lut.py run, measured every step and epoch.

Runs lut.py in this process with the flags given after `--` (epoch by epoch: the script's own
--exit-after-epochs and resume, which continue bit-identically), optionally beside the same run at
lambda = 0 (`--lambda0`: plain MAE inside lut.py, same crops, masks and schedule), and measures:

  per step   L_mim and L_bc, the gradient norm of each term of Eq. (3) on the online encoder
             (|grad mae_weight L_mim|, |grad lambda L_bc|, L2 over all encoder parameters), their ratio and
             the cosine between the two gradients; the lr. Observed by wrapping lut.forward_losses and
             differentiating its two losses with retain_graph (no randomness drawn, .grad untouched: the run
             is the one lut.py would do alone)
  per epoch  of the online encoder ("model"), on the val split with the evaluation transform: kNN top-1
             (k=20, T=0.07, CLS after the final norm, eval_knn.py's vote), mean pairwise cosine, effective
             rank and top-PC share (lab/feature_stats.py) of the CLS and of the pooled patch tokens
             (what the context head sees); relative distance of the encoder from its initialisation; mean
             BatchNorm gain |gamma| of the projector h and the predictor
  once       peak lr, warmup steps and the lr summed over the run and over the warmup (pre-training has no
             layer decay: the same for every block)

Writes OUTPUT_DIR/diagnose.json (and OUTPUT_DIR/lambda0/) and prints Markdown tables.

    python lab/lut_diagnose.py --output-dir runs/lut_diag --lambda0 -- --model vit_t16 --img-size 32 \\
        --patch-size 8 --data synthetic:2000:500 --num-workers 0 --device cpu --epochs 20 ...
"""
import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import lut  # noqa: E402
from feature_stats import spectrum  # noqa: E402
from refiner_diagnose import load_split, rel_distance  # noqa: E402
from eval_knn import knn_classify  # noqa: E402


class GradRecorder:
    """Per optimizer step: the two losses and their gradients on the online encoder (see the module docstring)."""

    def __init__(self, weight: float, mae_weight: float):
        self.weight, self.mae_weight, self.rows = weight, mae_weight, []

    def install(self):
        orig = lut.forward_losses
        rec = self

        def forward_losses(model, *a, **kw):
            loss_mim, loss_bc = orig(model, *a, **kw)
            if torch.is_grad_enabled() and loss_mim.requires_grad:
                params = [p for p in common.unwrap(model).encoder.parameters() if p.requires_grad]
                g1 = torch.autograd.grad(rec.mae_weight * loss_mim, params, retain_graph=True, allow_unused=True)
                g2 = torch.autograd.grad(rec.weight * loss_bc, params, retain_graph=True, allow_unused=True)
                flat = lambda gs: torch.cat([(g if g is not None else torch.zeros_like(p)).double().flatten()  # noqa: E731
                                             for g, p in zip(gs, params)])
                v1, v2 = flat(g1), flat(g2)
                n1, n2 = float(v1.norm()), float(v2.norm())
                rec.rows.append(dict(loss_mim=float(loss_mim), loss_bc=float(loss_bc), grad_mim=n1, grad_bc=n2,
                                     ratio=n2 / max(n1, 1e-30),
                                     grad_cos=float(v1 @ v2) / max(n1 * n2, 1e-30)))
            return loss_mim, loss_bc

        self.original = orig
        lut.forward_losses = forward_losses

    def uninstall(self):
        lut.forward_losses = self.original


@torch.no_grad()
def features(encoder, images: torch.Tensor, batch: int = 250):
    """(N, 3, S, S) -> CLS after the final norm (N, D) and the mean of the patch tokens (N, D) (lut.pooled)."""
    encoder.eval()
    cls, pool = [], []
    for x in images.split(batch):
        z = encoder.forward_features(x)  # (b, 1+N, D)
        cls.append(z[:, 0])
        pool.append(lut.pooled(z))
    return torch.cat(cls), torch.cat(pool)


def encoder_stats(enc, data, k: int) -> dict:
    """kNN top-1 (val against train) and the val features' spectrum, CLS and pooled patch tokens."""
    (xtr, ytr), (xva, yva) = data
    ctr, _ = features(enc, xtr)
    cva, pva = features(enc, xva)
    knn = knn_classify(ctr, ytr, cva, yva, [k], 0.07, int(ytr.max()) + 1)["top1"][k]
    out = {"knn": knn}
    for name, f in (("cls", cva), ("pooled", pva)):
        s = spectrum(f)
        out[name] = {key: s[key] for key in ("mean_cos", "eff_rank", "top_share")}
    return out


def load_vit(sd: dict, args, **kw):
    """A fresh encoder of the run's architecture with the weights `sd`."""
    enc = common.create_vit(args.model, img_size=args.img_size, patch_size=args.patch_size, **kw)
    common.load_encoder(enc, {"model": sd}, what="snapshot")
    return enc


def train_epoch_by_epoch(script, args, out: Path, recorder, after_epoch):
    """script.main one epoch at a time (--exit-after-epochs e + 1, resuming), `recorder` installed around each
    call, its output into OUTPUT_DIR/train.log; after_epoch(e + 1, checkpoint) after each."""
    out.mkdir(parents=True, exist_ok=True)
    for e in range(args.epochs):
        recorder.install()
        try:  # the script's own output (its flags at every restart, progress bars) into OUTPUT_DIR/train.log
            with open(out / "train.log", "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                script.main(dataclasses.replace(args, exit_after_epochs=e + 1))
        finally:
            recorder.uninstall()
        after_epoch(e + 1, torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=True))


def bn_gain(sd: dict) -> float:
    """Mean |gamma| of the BatchNorm1d of a mlp_head state dict (Linear-BN-ReLU-Linear: BN is module 1)."""
    return float(sd["1.weight"].abs().mean())


def diagnose(args: lut.Args, out: Path, data, k: int) -> dict:
    if (out / "checkpoint-last.pth").exists():
        raise common.UserError(f"{out} already holds a run; the diagnosis trains from the start: pass a new --output-dir")
    args = dataclasses.replace(args, output_dir=str(out))
    dim = common.VIT_CONFIGS[args.model][0]
    weight = args.context_weight if args.context_weight is not None else lut.default_context_weight(dim)
    n_train = len(data[0][1])
    steps_per_epoch = n_train // args.batch_size
    total, warm = steps_per_epoch * args.epochs, steps_per_epoch * args.warmup_epochs
    peak, _ = lut.peak_lr(args)
    lrs = [common.cosine_schedule(t, total, peak, min(args.min_lr, peak), warm) for t in range(total)]
    static = dict(context_weight=weight, peak_lr=peak, warmup_steps=warm, total_steps=total,
                  lr_sum=sum(lrs), lr_sum_warmup=sum(lrs[:warm]))

    common.seed_everything(args.seed)  # lut.main's initial encoder (same seed, same call)
    init_sd = common.create_vit(args.model, img_size=args.img_size, patch_size=args.patch_size).state_dict()
    per_epoch = {0: encoder_stats(load_vit(init_sd, args), data, k)}
    rec = GradRecorder(weight, args.mae_weight)

    def after_epoch(e, ck):
        d = encoder_stats(load_vit(ck["model"], args), data, k)
        dist = rel_distance(ck["model"], init_sd, common.VIT_CONFIGS[args.model][1])
        d.update(rel_dist=sum(dist.values()) / len(dist), head_bn_gain=bn_gain(ck["head"]),
                 pred_bn_gain=bn_gain(ck["predictor"]))
        per_epoch[e] = d
        print(f"[{out.name}] epoch {e}: kNN {d['knn']:.1f}, CLS mean cos {d['cls']['mean_cos']:.2f}, "
              f"pooled eff. rank {d['pooled']['eff_rank']:.1f}", flush=True)

    train_epoch_by_epoch(lut, args, out, rec, after_epoch)
    for t, r in enumerate(rec.rows):
        r["lr"] = lrs[t] if t < len(lrs) else float("nan")
    res = dict(args=dataclasses.asdict(args), static=static, per_step=rec.rows, per_epoch=per_epoch,
               steps_per_epoch=steps_per_epoch)
    (out / "diagnose.json").write_text(json.dumps(res, indent=2))
    return res


def report(runs: dict) -> str:
    L = []
    for name, r in runs.items():
        s = r["static"]
        L += [f"### {name}: lambda {s['context_weight']:g}, peak lr {s['peak_lr']:.3g}, warmup {s['warmup_steps']} of "
              f"{s['total_steps']} steps; lr summed over the run {s['lr_sum']:.3g} (warmup {s['lr_sum_warmup']:.3g}), "
              "every block", "",
              "| epoch | step | L_mim | L_bc | grad L_mim | grad lambda L_bc | ratio | grad cos | kNN | CLS cos | "
              "CLS eff. rank | pooled cos | pooled eff. rank | rel. dist | BN gain h / pred |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        spe = r["steps_per_epoch"]
        for e, d in r["per_epoch"].items():
            e = int(e)
            rows = r["per_step"][(e - 1) * spe:e * spe] if e else []
            mean = lambda key: sum(x[key] for x in rows) / len(rows) if rows else float("nan")  # noqa: E731
            gain = f"{d['head_bn_gain']:.2f} / {d['pred_bn_gain']:.2f}" if e else "-"
            L.append(f"| {e} | {e * spe} | {mean('loss_mim'):.3f} | {mean('loss_bc'):.3f} | {mean('grad_mim'):.2e} | "
                     f"{mean('grad_bc'):.2e} | {mean('ratio'):.3g} | {mean('grad_cos'):+.2f} | {d['knn']:.1f} | "
                     f"{d['cls']['mean_cos']:.2f} | {d['cls']['eff_rank']:.1f} | {d['pooled']['mean_cos']:.2f} | "
                     f"{d['pooled']['eff_rank']:.1f} | {d.get('rel_dist', 0.0):.2e} | {gain} |")
        L.append("")
    L.append("Losses and gradient norms: means over the epoch's steps; features: the val split's, after the epoch.")
    return "\n".join(L)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    own, ref = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--output-dir", required=True, help="a fresh folder: the run trains into it")
    ap.add_argument("--lambda0", action="store_true", help="also the same run at --context-weight 0 into OUTPUT_DIR/lambda0")
    ap.add_argument("--k", type=int, default=20, help="kNN k (the miniature's table: 20)")
    a = ap.parse_args(own)
    args = common.parse_args(lut.Args, ref + ["--output-dir", a.output_dir])
    lut.validate(args)
    data = load_split(args.data, "train", args.img_size), load_split(args.data, "val", args.img_size)
    out = Path(a.output_dir)
    runs = {"run": diagnose(args, out, data, a.k)}
    if a.lambda0:
        runs["lambda 0"] = diagnose(dataclasses.replace(args, context_weight=0.0), out / "lambda0", data, a.k)
    print(report(runs))


if __name__ == "__main__":
    try:
        main()
    except common.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
