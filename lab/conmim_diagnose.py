"""Why does ConMIM need a larger lr on its relative position bias in the miniature? An instrumented conmim.py run.

Runs conmim.py in this process with the flags given after `--` (epoch by epoch: --exit-after-epochs and
resume, which continue bit-identically) and measures what decides whether Eq. (3) can rank a masked
token's keys within a short run:

  per step   the loss (Eq. 3, mean over the masked tokens); the RMS gradient per entry of the shared relative
             position bias table and of the encoder's other parameters, and their ratio; how alike the
             masked positions' predictions q of one image are (mean pairwise cosine over pairs of masked
             positions; 1 = the mask tokens are still indistinguishable, the symmetry the table must break);
             the table's largest |entry|. Observed by wrapping conmim.forward_loss and differentiating its
             loss with retain_graph (no randomness drawn, .grad untouched: the run is conmim.py's own)
  per epoch  of the online encoder ("model"): kNN top-1 (k=20, T=0.07, CLS after the final norm, eval_knn.py's
             vote) and the val features' mean pairwise cosine and effective rank (lab/feature_stats.py)
  once       per optimizer group: the peak lr (with --rel-pos-lr-mult), weight decay and the lr summed over the
             run, which bounds how far Adam (steps of about lr) can move one table entry

Writes OUTPUT_DIR/diagnose.json and prints Markdown tables.

    python lab/conmim_diagnose.py --output-dir runs/conmim_diag -- --model vit_t16 --img-size 32 \\
        --patch-size 8 --data synthetic:2000:500 --num-workers 0 --device cpu --epochs 20 ...
"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import conmim  # noqa: E402
from lut_diagnose import encoder_stats, load_vit, train_epoch_by_epoch  # noqa: E402
from refiner_diagnose import load_split  # noqa: E402


def is_table(name: str) -> bool:
    return name.endswith("relative_position_bias_table")


class StepRecorder:
    """Per optimizer step: the loss, the gradient scale of the bias table against the rest, the masked
    predictions' similarity and the table's size."""

    def __init__(self):
        self.rows = []

    def install(self):
        orig = conmim.forward_loss
        rec = self

        def forward_loss(online, teacher, weak, strong, mask, temperature):
            seen = {}
            inner = online.head.forward
            online_mod = common.unwrap(online)

            def head(z):  # the projected tokens q of the corrupted view (the call inside `online`)
                out = inner(z)
                seen["q"] = out[:, 1:]
                return out
            online_mod.head.forward = head
            try:
                loss_sum, n = orig(online, teacher, weak, strong, mask, temperature)
            finally:
                del online_mod.head.forward  # back to the class's method
            if torch.is_grad_enabled() and loss_sum.requires_grad:
                named = [(k, p) for k, p in online_mod.encoder.named_parameters() if p.requires_grad]
                grads = torch.autograd.grad(loss_sum / n.clamp(min=1), [p for _, p in named], retain_graph=True,
                                            allow_unused=True)
                sq = {True: 0.0, False: 0.0}
                cnt = {True: 0, False: 0}
                for (k, p), g in zip(named, grads):
                    if g is not None:
                        sq[is_table(k)] += float((g.double() ** 2).sum())
                    cnt[is_table(k)] += p.numel()
                rms = {t: (sq[t] / cnt[t]) ** 0.5 if cnt[t] else float("nan") for t in (True, False)}
                q = F.normalize(seen["q"].detach().float(), dim=-1)  # (B, N, C)
                sims = []
                for b in range(q.shape[0]):
                    qm = q[b, mask[b]]  # (M, C) the masked positions of image b
                    M = qm.shape[0]
                    if M > 1:
                        sims.append(float(((qm @ qm.T).sum() - M) / (M * (M - 1))))
                self.rows.append(dict(loss=float(loss_sum / n.clamp(min=1)), grad_rms_table=rms[True],
                                      grad_rms_rest=rms[False], grad_ratio=rms[True] / max(rms[False], 1e-30),
                                      masked_q_cos=sum(sims) / max(len(sims), 1),
                                      table_absmax=conmim.rel_pos_absmax(online_mod.encoder)))
            return loss_sum, n

        self.original = orig
        conmim.forward_loss = forward_loss

    def uninstall(self):
        conmim.forward_loss = self.original


def diagnose(args: conmim.Args, out: Path, data, k: int) -> dict:
    if (out / "checkpoint-last.pth").exists():
        raise common.UserError(f"{out} already holds a run; the diagnosis trains from the start: pass a new --output-dir")
    args = dataclasses.replace(args, output_dir=str(out))
    rel = args.pos_embed == "rel"
    n_train = len(data[0][1])
    steps_per_epoch = n_train // args.batch_size
    total, warm = steps_per_epoch * args.epochs, steps_per_epoch * args.warmup_epochs
    peak = args.lr if args.lr is not None else args.blr * args.batch_size / 256
    lrs = [common.cosine_schedule(t, total, peak, min(args.min_lr, peak), warm) for t in range(total)]
    common.seed_everything(args.seed)  # conmim.main's initial encoder and branch (same seed, same calls)
    encoder = common.create_vit(args.model, img_size=args.img_size, patch_size=args.patch_size,
                                drop_path_rate=args.drop_path, rel_pos_bias=rel)
    init_sd = {k_: v.clone() for k_, v in encoder.state_dict().items()}
    online = conmim.ConMIMBranch(encoder, conmim.Projector(encoder.dim, args.head_hidden_dim, args.head_out_dim))
    groups = {}
    for g in conmim.build_param_groups(online, args):  # the script's own optimizer groups
        groups[g["name"]] = dict(peak_lr=peak * g["lr_scale"], weight_decay=g["weight_decay"],
                                 lr_sum=sum(lrs) * g["lr_scale"], params=sum(p.numel() for p in g["params"]))
    static = dict(peak_lr=peak, warmup_steps=warm, total_steps=total, groups=groups,
                  rel_pos_lr_mult=args.rel_pos_lr_mult, temperature=args.temperature,
                  chance_loss=float(torch.log(torch.tensor(float(encoder.num_patches)))))
    del online

    per_epoch = {0: encoder_stats(load_vit(init_sd, args, rel_pos_bias=rel), data, k)}
    rec = StepRecorder()

    def after_epoch(e, ck):
        d = encoder_stats(load_vit(ck["model"], args, rel_pos_bias=rel), data, k)
        tab = [v for k_, v in ck["model"].items() if is_table(k_)]
        d["table_absmax"] = float(tab[0].abs().max()) if tab else 0.0
        d["table_rms"] = float(tab[0].pow(2).mean().sqrt()) if tab else 0.0
        per_epoch[e] = d
        print(f"[{out.name}] epoch {e}: kNN {d['knn']:.1f}, max |b| {d['table_absmax']:.2f}", flush=True)

    train_epoch_by_epoch(conmim, args, out, rec, after_epoch)
    res = dict(args=dataclasses.asdict(args), static=static, per_step=rec.rows, per_epoch=per_epoch,
               steps_per_epoch=steps_per_epoch)
    (out / "diagnose.json").write_text(json.dumps(res, indent=2))
    return res


def report(r: dict) -> str:
    s = r["static"]
    L = [f"peak lr {s['peak_lr']:.3g}, warmup {s['warmup_steps']} of {s['total_steps']} steps, --rel-pos-lr-mult "
         f"{s['rel_pos_lr_mult']:g}, tau {s['temperature']:g}; chance loss log N = {s['chance_loss']:.3f}", "",
         "| optimizer group | parameters | peak lr | weight decay | lr summed over the run |", "|---|---|---|---|---|"]
    for name, g in s["groups"].items():
        L.append(f"| {name} | {g['params']} | {g['peak_lr']:.3g} | {g['weight_decay']:g} | {g['lr_sum']:.3g} |")
    L += ["", "| epoch | step | loss | grad RMS table | grad RMS rest | ratio | masked q cos | max abs b | kNN | "
          "CLS cos | CLS eff. rank |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    spe = r["steps_per_epoch"]
    for e, d in r["per_epoch"].items():
        e = int(e)
        rows = r["per_step"][(e - 1) * spe:e * spe] if e else []
        mean = lambda key: sum(x[key] for x in rows) / len(rows) if rows else float("nan")  # noqa: E731
        L.append(f"| {e} | {e * spe} | {mean('loss'):.3f} | {mean('grad_rms_table'):.2e} | {mean('grad_rms_rest'):.2e} | "
                 f"{mean('grad_ratio'):.3g} | {mean('masked_q_cos'):.3f} | {d.get('table_absmax', 0.0):.3f} | "
                 f"{d['knn']:.1f} | {d['cls']['mean_cos']:.2f} | {d['cls']['eff_rank']:.1f} |")
    L += ["", "Step columns: means over the epoch's steps; max abs b and the features: after the epoch."]
    return "\n".join(L)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    own, ref = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--output-dir", required=True, help="a fresh folder: the run trains into it")
    ap.add_argument("--k", type=int, default=20, help="kNN k (the miniature's table: 20)")
    a = ap.parse_args(own)
    args = common.parse_args(conmim.Args, ref + ["--output-dir", a.output_dir])
    conmim.validate(args)
    data = load_split(args.data, "train", args.img_size), load_split(args.data, "val", args.img_size)
    print(report(diagnose(args, Path(a.output_dir), data, a.k)))


if __name__ == "__main__":
    try:
        main()
    except common.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
