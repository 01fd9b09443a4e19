"""Training throughput of every method: one full optimizer step (forward, loss, backward, AdamW, EMA/queue
updates) built from the method file's own modules, the method's real augmentation pipeline, and (CUDA) the
peak memory. Prints a Markdown table.

Columns
  train img/s      images (not views) per second of the method's training step on a fixed batch that its own
                   augmentation produced (paper defaults for heads, decoder, queue, views; --grad-checkpointing
                   as given). One process, so no communication.
  ref img/s        timm's VisionTransformer of the same size: forward_features + backward + AdamW on the same
                   number of full-resolution images, measured in interleaved rounds with the method (machine
                   load hits both alike).
  ratio            train / ref: the method's cost relative to plain supervised-style ViT training. Machine
                   independent enough to compare across runs; absolute numbers are not (never test them).
  data img/s/core  the method's augmentation pipeline (e.g. 2 global + 10 local BYOL views for MIM-Refiner) on
                   in-memory PIL images of --src-size (JPEG decoding excluded), in the main process: images
                   per second that ONE data-loader worker delivers.
  workers to feed  train img/s / data img/s/core: data-loader workers (CPU cores) per GPU needed so that the
                   pipeline does not starve the step (add ~30% for JPEG decoding at ImageNet sizes).
  peak GB          torch.cuda.max_memory_allocated during the method's steps (CUDA only).

    python benchmarks/bench_train.py                      # CPU defaults: vit_t16 @ 32 px / patch 4, batch 16
    python benchmarks/bench_train.py --device cuda --models vit_b16 vit_h14 --img-size 224 --batch-size 64 \\
        --grad-checkpointing                              # GPU table (per-GPU batch)
"""
import argparse
import copy
import datetime
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import synthetic  # noqa: E402

METHODS = ("mae", "mae_ct", "mim_refiner", "lut", "conmim")


# ----------------------------------------------------------------------------------------------
# One training step per method, built from the method file's modules (same calls as its main())
# ----------------------------------------------------------------------------------------------
def _encoder(name, img, patch, gc, **kw):
    depth = kw.get("depth", common.VIT_CONFIGS[name][1])
    return common.create_vit(name, img_size=img, patch_size=patch, grad_checkpointing=depth if gc else 0, **kw)


def setup_mae(model, img, patch, gc, device):
    import mae
    a = mae.Args(model=model, img_size=img, patch_size=patch)
    enc = _encoder(model, img, patch, gc)
    dec = mae.MaeDecoder(enc.dim, enc.grid, enc.patch_size, a.decoder_dim, a.decoder_depth, a.decoder_heads,
                         grad_checkpointing=a.decoder_depth if gc else 0)
    m = mae.MaskedAutoencoder(enc, dec, a.mask_ratio, a.norm_pix_loss).to(device)
    opt = common.make_adamw(mae.build_param_groups(m, a.weight_decay, False), lr=1e-4, betas=(0.9, 0.95))
    transform = common.mae_train_transform(img, (a.crop_min_scale, 1.0))

    def step(batch):
        x, _, _ = batch
        with common.autocast(device):
            loss, _, _ = m(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, transform


def setup_mae_ct(model, img, patch, gc, device):
    import mae_ct
    a = mae_ct.resolve_args(mae_ct.Args(model=model, img_size=img, patch_size=patch))
    enc = _encoder(model, img, patch, gc)
    m = mae_ct.MaeCt(enc, a.pool, a.proj_hidden, a.proj_dim, a.pred_hidden).to(device)
    queue = mae_ct.NNQueue(a.queue_size, a.proj_dim).to(device)
    target = copy.deepcopy(m.projector).requires_grad_(False)
    ema = copy.deepcopy(enc).requires_grad_(False)
    mae_ct.set_trainable(m, 2, a.frozen_blocks)  # stage 2 (contrastive tuning): the expensive one
    opt = mae_ct.build_optimizer(m, 2, a, 1e-4, 1e-4)

    def step(batch):
        views, labels, ids = batch
        loss, _ = mae_ct.mae_ct_forward_loss(m, target, queue, views, ids, labels, a.temperature, a.topk, False, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        common.ema_update(target, m.projector, a.projector_ema)
        common.ema_update(ema, m.encoder, a.encoder_ema)
    return step, mae_ct.build_views(a)


def setup_mim_refiner(model, img, patch, gc, device):
    import mim_refiner as mr
    a = mr.resolve_args(mr.Args(model=model, img_size=img, patch_size=patch), post_norm=False)
    enc = _encoder(model, img, patch, gc)
    m = mr.Refiner(enc, a.head_blocks, a.head_hidden, a.head_dim, a.pred_hidden).to(device)
    queues = nn.ModuleList([mr.NNQueue(a.queue_size, a.head_dim) for _ in a.head_blocks]).to(device)
    ema = copy.deepcopy(enc).requires_grad_(False)
    mr.set_trainable(enc, "refine", a.freeze_blocks)  # stage "refine": the expensive one
    opt = mr.build_optimizer(m, "refine", a, 1e-4)

    def step(batch):
        views, labels, ids = batch
        n = views[0].shape[0]
        xg = torch.cat(views[:2])  # (2n, 3, S, S)
        xl = torch.cat(views[2:]) if len(views) > 2 else None  # (L*n, 3, s, s)
        with common.autocast(device):
            outputs = m(xg, xl, train_encoder=True)
        loss, _, _ = mr.refiner_loss(outputs, queues, ids, labels, n, a.topk, a.temperature, 0, False)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        common.ema_update(ema, enc, a.ema_momentum)
    return step, mr.build_views(a)


def setup_lut(model, img, patch, gc, device):
    import lut
    a = lut.Args(model=model, img_size=img, patch_size=patch)
    enc = _encoder(model, img, patch, gc)
    online = lut.LUTOnline(enc, a).to(device)
    momentum = lut.MomentumBranch(online).to(device)
    weight = a.context_weight if a.context_weight is not None else lut.default_context_weight(enc.dim)
    opt = common.make_adamw(common.param_groups(online.named_parameters(), a.weight_decay), 1e-4,
                            betas=(0.9, a.beta2))

    def step(batch):
        (weak, strong), _, _ = batch
        with common.autocast(device):
            lm, lb = lut.forward_losses(online, momentum, weak, strong, enc.num_patches, a.mask_ratio, a.symmetric)
        (a.mae_weight * lm + weight * lb).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        lut.momentum_update(momentum, online, a.momentum)
    return step, lut.lut_transform(a)


def setup_conmim(model, img, patch, gc, device):
    import conmim
    a = conmim.Args(model=model, img_size=img, patch_size=patch)
    enc = _encoder(model, img, patch, gc, drop_path_rate=a.drop_path, rel_pos_bias=a.pos_embed == "rel")  # the script's default backbone
    if enc.grid % a.mask_block:
        a.mask_block = 1
    online = conmim.ConMIMBranch(enc, conmim.Projector(enc.dim, a.head_hidden_dim, a.head_out_dim)).to(device)
    teacher = copy.deepcopy(online).requires_grad_(False)
    opt = common.make_adamw(common.param_groups(online.named_parameters(), a.weight_decay), 1e-4, betas=(0.9, 0.98))

    def step(batch):
        (weak, strong, mask), _, _ = batch
        with common.autocast(device):
            loss_sum, n_masked = conmim.forward_loss(online, teacher, weak, strong, mask, a.temperature)
        (loss_sum / n_masked.clamp(min=1)).backward()
        torch.nn.utils.clip_grad_norm_(online.parameters(), a.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        common.ema_update(teacher, online, a.momentum, copy_buffers=False)
    return step, conmim.ConMIMTransform(a, enc.grid)


SETUPS = {"mae": setup_mae, "mae_ct": setup_mae_ct, "mim_refiner": setup_mim_refiner, "lut": setup_lut,
          "conmim": setup_conmim}


# ----------------------------------------------------------------------------------------------
# Reference step, data pipeline, timing
# ----------------------------------------------------------------------------------------------
def reference_step(model, img, patch, device):
    """timm's ViT (same size): forward_features + backward + AdamW on full images."""
    import functools
    from timm.models.vision_transformer import VisionTransformer
    dim, depth, heads, _ = common.VIT_CONFIGS[model]
    ref = VisionTransformer(img_size=img, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, num_classes=0,
                            qkv_bias=True, norm_layer=functools.partial(nn.LayerNorm, eps=1e-6)).to(device)
    opt = common.make_adamw([{"params": list(ref.parameters())}], lr=1e-4)

    def step(x):
        with common.autocast(device):
            out = ref.forward_features(x)
        out.float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


class PilImages(torch.utils.data.Dataset):
    """In-memory PIL images (synthetic shapes at --src-size), so the pipeline is timed without disk or decoding."""

    def __init__(self, n, size, transform):
        base = synthetic.SyntheticShapes(n, img_size=size, seed=0)
        from PIL import Image
        self.images = [Image.fromarray(base.render(i)[0]) for i in range(n)]
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), i % 10, i


def to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    return batch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def data_ips(ds, batch, workers, n_batches):
    """Images/s of the augmentation pipeline through a DataLoader (first batch, i.e. worker start-up, excluded)."""
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                         persistent_workers=False)
    it = iter(loader)
    next(it)
    t0, n = time.perf_counter(), 0
    for _ in range(n_batches):
        try:
            b = next(it)
        except StopIteration:
            it = iter(loader)
            b = next(it)
        n += b[1].shape[0]
    return n / (time.perf_counter() - t0)


def bench_one(method, model, img, patch, batch, a, device):
    torch.manual_seed(0)
    step, transform = SETUPS[method](model, img, patch, a.grad_checkpointing, device)
    ds = PilImages(max(batch, a.data_images), a.src_size or int(round(img * 8 / 7)), transform)
    if a.data_only:
        return dict(data=data_ips(ds, batch, a.workers, a.data_batches))
    fixed = next(iter(torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False, num_workers=0)))
    fixed = to_device(fixed, device)
    ref = reference_step(model, img, patch, device)
    x_ref = torch.randn(batch, 3, img, img)
    peak = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(a.warmup):
        step(fixed)
    sync(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 1e9
    for _ in range(a.warmup):
        ref(x_ref)
    times = {"train": [], "ref": []}
    for _ in range(a.rounds):  # interleaved: machine load affects both alike
        for key, fn, arg in (("train", step, fixed), ("ref", ref, x_ref)):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(a.iters):
                fn(arg)
            sync(device)
            times[key].append((time.perf_counter() - t0) / a.iters)
    train = batch / statistics.median(times["train"])
    ref_ips = batch / statistics.median(times["ref"])
    data = data_ips(ds, batch, a.workers, a.data_batches)
    data_per_core = data / max(a.workers, 1)
    return dict(train=train, ref=ref_ips, data=data, workers=math.ceil(train / data_per_core), peak=peak)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--models", nargs="+", default=["vit_t16"])
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=None, help="default: 4 when --img-size < 64, else the model's own")
    p.add_argument("--batch-size", type=int, default=16, help="images per step (per GPU)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--src-size", type=int, default=None, help="side of the source images; default img*8/7 (256 at 224)")
    p.add_argument("--workers", type=int, default=0, help="data-loader workers for the pipeline measurement (0: main process)")
    p.add_argument("--data-images", type=int, default=64, help="distinct in-memory source images")
    p.add_argument("--data-batches", type=int, default=4, help="timed pipeline batches")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds (median taken)")
    p.add_argument("--iters", type=int, default=2, help="steps per round")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data-only", action="store_true", help="only the augmentation pipeline column (CPU work, any machine)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        hw = torch.cuda.get_device_name()
    else:
        hw = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {os.cpu_count()} cores"
    print(f"{datetime.date.today()} | {device.type}: {hw} | torch {torch.__version__} | "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'} | batch {a.batch_size} | img {a.img_size} | "
          f"grad ckpt {'on' if a.grad_checkpointing else 'off'} | data workers {a.workers}")
    cols = ["method", "model", "train img/s", "ref (timm ViT) img/s", "ratio", "data img/s/core", "workers to feed"]
    if a.data_only:
        cols = ["method", "img", "views per image", "data img/s/core"]
    elif device.type == "cuda":
        cols.append("peak GB")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for model in a.models:
        patch = a.patch_size or (4 if a.img_size < 64 else common.VIT_CONFIGS[model][3])
        for method in a.methods:
            r = bench_one(method, model, a.img_size, patch, a.batch_size, a, device)
            if a.data_only:
                views = {"mae": "1", "mae_ct": "2", "mim_refiner": "2 global + 10 local", "lut": "2", "conmim": "2 + mask"}
                print(f"| {method} | {a.img_size} (src {a.src_size or int(round(a.img_size * 8 / 7))}) | {views[method]} | "
                      f"{r['data'] / max(a.workers, 1):.0f} |", flush=True)
                continue
            row = [method, f"{model}/{patch} @{a.img_size}", f"{r['train']:.1f}", f"{r['ref']:.1f}",
                   f"{r['train'] / r['ref']:.2f}", f"{r['data'] / max(a.workers, 1):.0f}", str(r["workers"])]
            if device.type == "cuda":
                row.append(f"{r['peak']:.1f}")
            print("| " + " | ".join(row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
