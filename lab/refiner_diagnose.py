"""Does MIM-Refiner move its encoder? An instrumented refinement run, measured after every epoch.

Runs mim_refiner.py in this process with the flags given after `--` (epoch by epoch: the script's own
--exit-after-epochs and resume, which continue bit-identically) and measures what decides whether the
refinement can change the evaluated encoder within a short run:

  per epoch  per-block relative distance |theta_b - theta_b(init)| / |theta_b(init)| of the online encoder
             and of its EMA (the evaluated "model"); kNN top-1 (k=20, T=0.07, CLS per block, eval_knn.py's
             protocol and vote) of both; per head: NNA loss, NN label agreement (the NN-swap accuracy the
             script logs), cosine similarity of a query to its NN, how often the NN is the sample's own
             (older) queue entry and how often that entry is in the queue at all
  once       peak lr per encoder block after layer-wise decay (the optimizer's own groups), EMA weight still
             on the initial encoder after the run (m^T), queue size vs dataset size, views per image,
             the frozen encoder's own top-1 NN label agreement per head block (what a ready head can reach)

The lookups are observed by wrapping NNQueue.lookup and refiner_loss (no randomness is drawn, so the run
is the one mim_refiner.py would do alone). Writes OUTPUT_DIR/diagnose.json and prints Markdown tables.

    python lab/refiner_diagnose.py --output-dir runs/diag -- --init runs/demo/runs/mae/checkpoint-last.pth \
        --model vit_t16 --img-size 32 --patch-size 8 --data synthetic:2000:500 --num-workers 0 --device cpu ...
"""
import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import mim_refiner  # noqa: E402
from eval_knn import knn_classify  # noqa: E402


class LookupRecorder:
    """Per-head statistics of every NN lookup of the run, grouped by epoch (set `epoch` from outside)."""

    def __init__(self):
        self.epoch, self.ids, self.head = 0, None, 0
        self.stats = {}  # (epoch, head) -> sums

    def install(self):
        orig_loss, orig_lookup = mim_refiner.refiner_loss, mim_refiner.NNQueue.lookup
        rec = self

        def refiner_loss(outputs, queues, ids, *a, **kw):
            rec.ids, rec.head = torch.cat([ids, ids]), 0  # (2n,) ids of [g0; g1], as refiner_loss queries
            return orig_loss(outputs, queues, ids, *a, **kw)

        def lookup(queue, z, ids=None, topk=1):
            nn_x, pos = orig_lookup(queue, z, ids, topk)
            own = rec.ids.to(queue.ids.device)
            s = rec.stats.setdefault((rec.epoch, rec.head), dict(n=0, self_match=0, own_in_queue=0, sim=0.0))
            s["n"] += z.shape[0]
            s["self_match"] += int((queue.ids[pos] == own).sum())
            s["own_in_queue"] += int((queue.ids[None, :] == own[:, None]).any(1).sum())
            s["sim"] += float((F.normalize(z.float(), dim=1) * F.normalize(nn_x, dim=1)).sum())
            rec.head += 1
            return nn_x, pos

        self.originals = orig_loss, orig_lookup
        mim_refiner.refiner_loss, mim_refiner.NNQueue.lookup = refiner_loss, lookup

    def uninstall(self):
        mim_refiner.refiner_loss, mim_refiner.NNQueue.lookup = self.originals


def block_params(sd: dict, depth: int) -> dict:
    """State dict -> {block index: flat fp64 vector of its parameters}; -1 = stem, depth = final norm."""
    out = {}
    for k, v in sd.items():
        if k == "pos_embed" or not torch.is_floating_point(v):
            continue
        b = int(k.split(".")[1]) if k.startswith("blocks.") else (depth if k.startswith("norm.") else -1)
        out.setdefault(b, []).append(v.double().flatten())
    return {b: torch.cat(v) for b, v in out.items()}


def rel_distance(sd: dict, sd0: dict, depth: int) -> dict:
    p, p0 = block_params(sd, depth), block_params(sd0, depth)
    return {b: float((p[b] - p0[b]).norm() / p0[b].norm()) for b in sorted(p0)}


@torch.no_grad()
def block_features(encoder, images: torch.Tensor, batch: int = 250) -> torch.Tensor:
    """(N, 3, S, S) -> (depth, N, D) CLS per block: raw block outputs, the last after the final norm
    (eval_knn.py's default feature for the last block)."""
    encoder.eval()
    depth, outs = encoder.depth, []
    for x in images.split(batch):
        final, blocks = encoder.forward_features(x, return_blocks=list(range(depth - 1)))
        outs.append(torch.stack([o[:, 0] for o in blocks] + [final[:, 0]]))
    return torch.cat(outs, dim=1)


def knn_per_block(encoder, data, k: int = 20) -> list:
    (xtr, ytr), (xva, yva) = data
    ftr, fva = block_features(encoder, xtr), block_features(encoder, xva)
    nc = int(ytr.max()) + 1
    return [knn_classify(ftr[b], ytr, fva[b], yva, [k], 0.07, nc)["top1"][k] for b in range(encoder.depth)]


def nn_label_agreement(encoder, xtr, ytr, blocks) -> dict:
    """Top-1 NN (cosine, leave-one-out) label agreement of the frozen encoder's CLS features per block."""
    f = block_features(encoder, xtr)
    out = {}
    for b in blocks:
        fb = F.normalize(f[b].float(), dim=1)
        sim = fb @ fb.T
        sim.fill_diagonal_(-2.0)
        out[b] = 100.0 * float((ytr[sim.argmax(1)] == ytr).float().mean())
    return out


def load_split(data: str, split: str, img_size: int):
    ds = common.build_dataset(data, split, common.eval_transform(img_size), img_size=img_size, require_labels=True)
    xs, ys = zip(*[ds[i] for i in range(len(ds))])
    return torch.stack(xs), torch.tensor(ys)


def encoder_from(sd: dict, args: mim_refiner.Args):
    enc = common.create_vit(args.model, img_size=args.img_size, patch_size=args.patch_size)
    common.load_encoder(enc, {"model": sd}, what="snapshot")
    return enc


def epoch_logs(log_path: Path, heads: list, steps_per_epoch: int) -> dict:
    """log.jsonl -> {epoch: {"loss": {block: mean}, "nn_acc": {block: mean}}} (means over the epoch's steps)."""
    acc = {}
    for line in log_path.read_text().splitlines():
        r = json.loads(line)
        if "train/epoch" not in r:
            continue
        e = acc.setdefault(int(r["train/epoch"]), {"loss": {b: [] for b in heads}, "nn_acc": {b: [] for b in heads}})
        for b in heads:
            e["loss"][b].append(r[f"train/loss_block{b}"])
            e["nn_acc"][b].append(100.0 * r[f"train/nn_acc_block{b}"])
    return {ep: {m: {b: sum(v) / len(v) for b, v in d.items()} for m, d in e.items()} for ep, e in acc.items()}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    own, ref = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--output-dir", required=True, help="the refinement run's folder (a fresh one: it trains)")
    ap.add_argument("--k", type=int, default=20, help="kNN k (the demo's table: 20)")
    a = ap.parse_args(own)
    args = common.parse_args(mim_refiner.Args, ref + ["--output-dir", a.output_dir])
    out = Path(a.output_dir)
    if (out / "checkpoint-last.pth").exists():
        raise common.UserError(f"{out} already holds a run; the diagnosis trains from the start: pass a new --output-dir")
    torch.manual_seed(0)
    data = load_split(args.data, "train", args.img_size), load_split(args.data, "val", args.img_size)
    init_sd, _ = common.select_weights(common.load_file(args.init))
    init_sd = common.convert_to_ours(init_sd)
    init_enc = encoder_from(init_sd, args)
    depth = init_enc.depth

    # static quantities, from the script's own resolution of the flags and its own optimizer groups
    r = mim_refiner.resolve_args(dataclasses.replace(args), post_norm=False)
    model = mim_refiner.Refiner(init_enc, r.head_blocks, r.head_hidden, r.head_dim, r.pred_hidden)
    mim_refiner.set_trainable(init_enc, "refine", r.freeze_blocks)
    peak = r.lr if r.lr is not None else r.blr * r.batch_size / 256
    opt = mim_refiner.build_optimizer(model, "refine", r, peak)
    lr_block = {}
    for g in opt.param_groups:
        if g["name"].startswith("encoder_layer"):
            lid = int(g["name"].split("layer")[1].split("_")[0])  # 0 stem, 1..depth blocks, depth+1 final norm
            lr_block[lid - 1] = g["lr_scale"]
    n_train = len(data[0][1])
    steps_per_epoch = n_train // r.batch_size
    refine_steps = r.epochs * steps_per_epoch
    # the integral of the schedule: how far Adam (steps of about lr per parameter) can move a block in the run
    warm = int(r.warmup_epochs * steps_per_epoch)
    lr_sum = sum(mim_refiner.lr_factor(t, refine_steps, warm, r.min_lr / peak) for t in range(refine_steps))
    static = dict(head_blocks=r.head_blocks, peak_lr=peak, lr_per_block=lr_block,
                  lr_sum_per_block={b: v * lr_sum for b, v in lr_block.items()},
                  ema_momentum=r.ema_momentum, refine_steps=refine_steps,
                  ema_init_weight=r.ema_momentum ** refine_steps,
                  ema_init_weight_paper=0.9999 ** refine_steps,
                  queue_size=r.queue_size, dataset_size=n_train, queue_over_dataset=r.queue_size / n_train,
                  queue_age_steps=r.queue_size / r.batch_size, views=2 + r.local_crops, local_size=r.local_size,
                  topk=r.topk, temperature=r.temperature, exclude_self=r.exclude_self,
                  frozen_nn_agreement=nn_label_agreement(init_enc, *data[0], r.head_blocks))
    del model, opt

    rec = LookupRecorder()
    total = r.head_epochs + r.epochs
    per_epoch = {-1: dict(stage="init", knn_online=knn_per_block(encoder_from(init_sd, args), data, a.k))}
    per_epoch[-1]["knn_ema"] = per_epoch[-1]["knn_online"]
    for e in range(total):
        rec.epoch = e
        rec.install()
        try:
            mim_refiner.main(dataclasses.replace(args, exit_after_epochs=e + 1))
        finally:
            rec.uninstall()
        ck = torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=True)
        per_epoch[e] = dict(stage=ck["stage"],
                            dist_online=rel_distance(ck["model_online"], init_sd, depth),
                            dist_ema=rel_distance(ck["model"], init_sd, depth),
                            knn_online=knn_per_block(encoder_from(ck["model_online"], args), data, a.k),
                            knn_ema=knn_per_block(encoder_from(ck["model"], args), data, a.k))
        print(f"epoch {e} ({ck['stage']}): kNN@{a.k} last block online {per_epoch[e]['knn_online'][-1]:.1f} "
              f"EMA {per_epoch[e]['knn_ema'][-1]:.1f} (init {per_epoch[-1]['knn_online'][-1]:.1f})", flush=True)
    logs = epoch_logs(out / "log.jsonl", r.head_blocks, steps_per_epoch)
    for e in range(total):
        per_epoch[e].update(logs.get(e, {}))
        per_epoch[e]["lookup"] = {}
        for h, b in enumerate(r.head_blocks):
            s = rec.stats.get((e, h))
            if s:
                per_epoch[e]["lookup"][b] = dict(self_match=100.0 * s["self_match"] / s["n"],
                                                 own_in_queue=100.0 * s["own_in_queue"] / s["n"], sim=s["sim"] / s["n"])
    res = dict(refiner_args=dataclasses.asdict(r), static=static, per_epoch=per_epoch)
    (out / "diagnose.json").write_text(json.dumps(res, indent=2, default=str))
    print(report(res))


def report(res: dict) -> str:
    s, pe = res["static"], res["per_epoch"]
    L = [f"peak lr {s['peak_lr']:.3g}; per block (after layer decay): "
         + ", ".join(f"{b}: {v:.2e}" for b, v in sorted(s["lr_per_block"].items()) if 0 <= int(b)),
         "sum of the lr over the refinement per block: "
         + ", ".join(f"{b}: {v:.2g}" for b, v in sorted(s["lr_sum_per_block"].items()) if 0 <= int(b)),
         f"EMA momentum {s['ema_momentum']} over {s['refine_steps']} refinement steps: weight left on the initial "
         f"encoder {s['ema_init_weight']:.3f} (0.9999: {s['ema_init_weight_paper']:.3f})",
         f"queue {s['queue_size']} vs dataset {s['dataset_size']} ({s['queue_over_dataset']:.2f}; entries "
         f"{s['queue_age_steps']:.0f} steps old at most); {s['views']} views per image (locals {s['local_size']} px); "
         f"topk {s['topk']}, tau {s['temperature']}, exclude-self {s['exclude_self']}",
         "frozen MAE encoder, top-1 NN label agreement per head block: "
         + ", ".join(f"{b}: {v:.1f}" for b, v in s["frozen_nn_agreement"].items()), ""]
    heads = s["head_blocks"]
    L.append("| epoch | stage | " + " | ".join(f"loss/NN acc/sim/self b{b}" for b in heads) + " |")
    L.append("|---|---|" + "---|" * len(heads))
    for e, d in pe.items():
        if int(e) < 0:
            continue
        cells = []
        for b in heads:
            lk = d.get("lookup", {}).get(b) or d.get("lookup", {}).get(str(b)) or {}
            loss = d.get("loss", {}).get(b, d.get("loss", {}).get(str(b), math.nan))
            acc = d.get("nn_acc", {}).get(b, d.get("nn_acc", {}).get(str(b), math.nan))
            cells.append(f"{loss:.2f} / {acc:.0f} / {lk.get('sim', math.nan):.2f} / {lk.get('self_match', math.nan):.1f}")
        L.append(f"| {e} | {d['stage']} | " + " | ".join(cells) + " |")
    L += ["", "| epoch | encoder | " + " | ".join(f"b{b}" for b in range(len(pe[next(iter(pe))]["knn_online"]))) + " |",
          "|---|---|" + "---|" * len(pe[next(iter(pe))]["knn_online"])]
    for e, d in pe.items():
        for w in ("online", "ema"):
            if int(e) < 0 and w == "ema":
                continue
            L.append(f"| {e} | {w} kNN | " + " | ".join(f"{v:.1f}" for v in d[f"knn_{w}"]) + " |")
            if f"dist_{w}" in d:
                dist = {int(k): v for k, v in d[f"dist_{w}"].items()}
                L.append(f"| {e} | {w} rel. dist | " + " | ".join(f"{dist[b]:.1e}" for b in range(len(d[f'knn_{w}']))) + " |")
    return "\n".join(L)


if __name__ == "__main__":
    try:
        main()
    except common.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
