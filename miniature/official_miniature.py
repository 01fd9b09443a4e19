"""The official LUT or ConMIM model and loss, trained on the miniature with the same data and schedule as lut.py /
conmim.py (the `lut-official` and `conmim-official` rows of miniature/mini_repro.py).

Does the official code behave as ours at this scale? This script imports the model and loss code of a local
checkout of the official repository and trains it with the hyper-parameters of the given lut.py / conmim.py
flags (data, batch, epochs, warmup, peak lr, momentum, head widths, masking, seed):

  lut     naver-ai/lut: models/models_lut.py MaskedAutoencoderViT_LUT (the official two-sided model, both views
          masked with disjoint visible sets), engines/engine_lut.py's loss_ftn over the cross-view pairs,
          util/model_ema_sched.ModelEma_sched (the whole model, state dict, eval mode) with util/augs.py's
          cosine_scheduler for the decay, util/lr_sched.adjust_learning_rate, AdamW on timm's weight-decay
          groups (main_lut.py). Views: lut.lut_transform (= main_lut.py TwoGlobalViewAugmentation).
  conmim  TencentARC/ConMIM: modeling_pretrain.py VisionTransformerForMaskedImageModeling (BEiT backbone with
          layer scale 0.1, shared relative position bias, MoCo v3 projector), engine_for_pretraining.py's loss
          and momentum update (shared named parameters), optim_factory.get_parameter_groups with the model's
          skip list, utils.cosine_scheduler for lr, weight decay and momentum (run_conmim_pretraining.py);
          --rel-pos-lr-mult (not an official flag) as an lr_scale on the table's own group, which the
          official engine multiplies into the scheduled lr.
          Inputs and masks: conmim.ConMIMTransform (= the official DataAugmentationForConMIM with its
          random_mps masking).

Shims for the official code's own import errors, nothing else: naver-ai/lut imports a missing
`util.utils_dino.trunc_normal_` (timm's is given) and `models/__init__.py` imports factory names that do not
exist (models_lut.py is loaded directly), util/misc.py imports `torch._six.inf` and util/pos_embed.py uses `np.float` (both gone); ConMIM's utils.py imports `torch._six.inf` (gone in torch 2) and
tensorboardX (unused here), optim_factory.py optimizers that timm 1.x dropped (only its AdamW
branch runs); its engine hard-codes `length = 196` patches (the number of patches is used).
CPU, fp32 (the official autocast and loss scaler are CUDA-only). The encoder is saved as "model" in this
repository's ViT layout (LUT: the timm/MAE keys; ConMIM: layer scale folded into attn.proj / mlp.fc2, q/v
biases into qkv.bias with a zero key bias, exact, checked against the official forward at the start and the
end), so eval_knn.py and eval_linear.py read it; checkpoint-init.pth holds the official initialisation.

    git clone https://github.com/naver-ai/lut ../lut
    python miniature/official_miniature.py lut --repo ../lut --output-dir runs/lut_official -- \\
        --model vit_t16 --img-size 32 --patch-size 8 --data synthetic:2000:500 --batch-size 128 --epochs 20 ...
"""
import argparse
import copy
import dataclasses
import importlib.util
import json
import math
import subprocess
import sys
import time
import types
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def load(repo: Path, rel: str, name: str):
    """Import one file of the official checkout as module `name` (its own imports resolve inside the repo)."""
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    spec = importlib.util.spec_from_file_location(name, repo / rel)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def shim(name: str, **attrs):
    mod = sys.modules.get(name) or types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod


def shim_missing(names: dict):
    """{module: [attribute, ...]}: attributes the official imports expect that the installed versions lack (None)."""
    for mod_name, attrs in names.items():
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            mod = types.ModuleType(mod_name)
            sys.modules[mod_name] = mod
        for a in attrs:
            if not hasattr(mod, a):
                setattr(mod, a, None)


def repo_commit(repo: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def our_encoder(sd: dict, args, rel_pos_bias: bool):
    """`sd` (our ViT keys) in a fresh encoder of the run's architecture (strict load)."""
    enc = common.create_vit(args.model, img_size=args.img_size, patch_size=args.patch_size, rel_pos_bias=rel_pos_bias)
    common.load_encoder(enc, {"model": sd}, what="the official model's encoder")
    return enc.eval()


@torch.no_grad()
def check_conversion(official_tokens, sd: dict, args, rel_pos_bias: bool, when: str) -> float:
    """The converted encoder must compute the official encoder's tokens (after the final norm) on a fixed batch."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, args.img_size, args.img_size, generator=g)
    diff = float((our_encoder(sd, args, rel_pos_bias).forward_features(x) - official_tokens(x)).abs().max())
    if not diff < 1e-4:
        raise SystemExit(f"error: the official encoder converted to this repository's ViT differs by {diff:.2e} ({when})")
    print(f"encoder conversion checked {when}: max |difference| {diff:.1e}", flush=True)
    return diff


def save_encoder(path: Path, sd: dict, args, rel_pos_bias: bool, extra: dict):
    enc = our_encoder(sd, args, rel_pos_bias)
    common.save_checkpoint(str(path), {"model": enc.state_dict(), "encoder_config": enc.config(),
                                                               "model_is_ema": False, **extra})


def loader(ds, args, epoch: int):
    """The scripts' own data order (common.build_loader, seeded per epoch)."""
    return common.build_loader(ds, args.batch_size, common.DistInfo(), shuffle=True, drop_last=True,
                               num_workers=args.num_workers, seed=args.seed, epoch=epoch)


# ================================================================================================
# naver-ai/lut
# ================================================================================================
def train_lut(repo: Path, args, out: Path, log):
    import lut
    import timm.layers
    from timm.optim import param_groups_weight_decay  # timm's current name of main_lut.py's add_weight_decay
    shim("util.utils_dino", trunc_normal_=timm.layers.trunc_normal_)
    shim("torch._six", inf=math.inf)
    models_lut = load(repo, "models/models_lut.py", "official_models_lut")
    engine = load(repo, "engines/engine_lut.py", "official_engine_lut")
    ema_mod = load(repo, "util/model_ema_sched.py", "official_model_ema_sched")
    augs = load(repo, "util/augs.py", "official_augs")
    lr_sched = load(repo, "util/lr_sched.py", "official_lr_sched")
    if args.head_hidden_dim != args.pred_hidden_dim:
        raise common.UserError("the official model has one hidden width for head and predictor: pass "
                               "--head-hidden-dim equal to --pred-hidden-dim")
    dim, depth, heads, patch = common.VIT_CONFIGS[args.model]
    common.seed_everything(args.seed)
    np.float = float  # util/pos_embed.py (MAE's) uses the alias numpy 1.24 removed
    model = models_lut.MaskedAutoencoderViT_LUT(
        img_size=args.img_size, patch_size=args.patch_size or patch, embed_dim=dim, depth=depth, num_heads=heads,
        decoder_embed_dim=args.decoder_dim, decoder_depth=args.decoder_depth, decoder_num_heads=args.decoder_heads,
        depth_head=2, depth_pred=2, head_mlp_dim=args.head_hidden_dim, head_norm_layer=nn.BatchNorm1d,
        mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6), norm_pix_loss=args.norm_pix_loss)
    del np.float
    keep = ("patch_embed.", "cls_token", "pos_embed", "blocks.", "norm.")
    encoder_sd = lambda: {k: v.clone() for k, v in model.state_dict().items() if k.startswith(keep)}  # noqa: E731

    def official_tokens(x):
        was = model.training
        model.eval()
        tokens = model.forward_encoder(x, x, args.mask_ratio, ema=True)[0]  # (B, 1+N, D) after the final norm
        model.train(was)
        return tokens
    init_sd = encoder_sd()
    check_conversion(official_tokens, init_sd, args, False, "at the start")
    ds = common.build_dataset(args.data, "train", lut.lut_transform(args), img_size=args.img_size, seed=args.seed)
    spe = len(ds) // args.batch_size
    ema = ema_mod.ModelEma_sched(model, decay=augs.cosine_scheduler(args.momentum, args.momentum_final, args.epochs, spe))
    peak, _ = lut.peak_lr(args)
    opt = torch.optim.AdamW(param_groups_weight_decay(model, args.weight_decay), lr=peak, betas=(0.9, args.beta2))
    sched = SimpleNamespace(lr=peak, min_lr=min(args.min_lr, peak), warmup_epochs=args.warmup_epochs, epochs=args.epochs)
    w_bc = args.context_weight if args.context_weight is not None else lut.default_context_weight(dim)
    for epoch in range(args.epochs):
        model.train()
        sums, t0 = {"mae": 0.0, "bc": 0.0}, time.time()
        for i, ((weak, strong), _) in enumerate(loader(ds, args, epoch)):
            lr_sched.adjust_learning_rate(opt, i / spe + epoch, sched)
            # engine_lut.train_one_epoch's step (without the CUDA autocast and loss scaler)
            mae_loss, student_output, _ = model(weak, strong, mask_ratio=args.mask_ratio)
            _, teacher_output, _ = ema.ema(weak, strong, mask_ratio=args.mask_ratio, ema=True)
            student_outs, teacher_outs = student_output.chunk(2), teacher_output.detach().chunk(2)
            bc_loss, n_terms = 0, 0
            for iq, q in enumerate(teacher_outs):
                for v in range(len(student_outs)):
                    if v != iq:
                        bc_loss += engine.loss_ftn(student_outs[v], q).mean()
                        n_terms += 1
            bc_loss /= n_terms
            total = args.mae_weight * mae_loss + w_bc * bc_loss
            if not math.isfinite(float(total.detach())):
                raise common.UserError(f"the official LUT loss is {float(total.detach())} at epoch {epoch} step {i}")
            total.backward()
            opt.step()
            opt.zero_grad()
            ema.update(model, spe * epoch + i)
            sums["mae"] += float(mae_loss)
            sums["bc"] += float(bc_loss)
        log(epoch, {"loss_mim": sums["mae"] / spe, "loss_bc": sums["bc"] / spe, "seconds": time.time() - t0})
    check_conversion(official_tokens, encoder_sd(), args, False, "at the end")
    return encoder_sd(), init_sd, False


# ================================================================================================
# TencentARC/ConMIM
# ================================================================================================
def to_our_layout(sd: dict) -> dict:
    """Official BEiT encoder keys -> this repository's ViT: gamma_1 / gamma_2 (layer scale) multiply the outputs of
    attn.proj / mlp.fc2 and fold into their weights and biases; q_bias, v_bias -> qkv.bias with a zero key bias
    (the official forward concatenates the same); the shared table keeps its name."""
    out = {}
    for k, v in sd.items():
        if k.startswith(("lm_head", "projectors", "mask_token")) or k.endswith(("gamma_1", "gamma_2")) \
                or k.endswith("relative_position_index"):
            continue
        out[k] = v.clone()
    for k, v in sd.items():
        if k.endswith("attn.q_bias"):
            b = k[:-len("q_bias")]
            out[b + "qkv.bias"] = torch.cat([v, torch.zeros_like(v), sd[b + "v_bias"]])
            del out[k], out[b + "v_bias"]
        for g, layer in (("gamma_1", "attn.proj"), ("gamma_2", "mlp.fc2")):
            if k.endswith(g):
                blk = k[:-len(g)]
                out[blk + layer + ".weight"] = out[blk + layer + ".weight"] * v[:, None]
                out[blk + layer + ".bias"] = out[blk + layer + ".bias"] * v
    return out


def train_conmim(repo: Path, args, out: Path, log):
    import conmim
    shim("torch._six", inf=math.inf)
    shim("tensorboardX", SummaryWriter=None)
    # optim_factory.py imports optimizers that timm 1.x renamed or dropped; only its AdamW branch runs here
    shim_missing({"timm.optim.adafactor": ["Adafactor"], "timm.optim.adahessian": ["Adahessian"],
                  "timm.optim.adamp": ["AdamP"], "timm.optim.lookahead": ["Lookahead"], "timm.optim.nadam": ["Nadam"],
                  "timm.optim.novograd": ["NovoGrad"], "timm.optim.nvnovograd": ["NvNovoGrad"],
                  "timm.optim.radam": ["RAdam"], "timm.optim.rmsprop_tf": ["RMSpropTF"], "timm.optim.sgdp": ["SGDP"]})
    mp = load(repo, "modeling_pretrain.py", "official_modeling_pretrain")
    utils = load(repo, "utils.py", "official_conmim_utils")
    optim_factory = load(repo, "optim_factory.py", "official_optim_factory")
    dim, depth, heads, patch = common.VIT_CONFIGS[args.model]

    def get_model():  # run_conmim_pretraining.get_model
        return mp.VisionTransformerForMaskedImageModeling(
            img_size=args.img_size, patch_size=args.patch_size or patch, embed_dim=dim, depth=depth, num_heads=heads,
            mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), drop_path_rate=args.drop_path,
            use_shared_rel_pos_bias=True, use_abs_pos_emb=False, init_values=0.1, use_mlp_projectors=True,
            dim=args.head_out_dim, mlp_dim=args.head_hidden_dim)
    common.seed_everything(args.seed)
    model, model_copy = get_model(), get_model()
    model_copy.load_state_dict(model.state_dict(), strict=False)
    for p in model_copy.parameters():
        p.requires_grad = False

    def official_tokens(x):
        was = model.training
        model.eval()
        tokens = model.forward_features(x, bool_masked_pos=torch.zeros(x.shape[0], model.patch_embed.num_patches,
                                                                       dtype=torch.bool))
        model.train(was)
        return tokens
    init_sd = to_our_layout(model.state_dict())
    check_conversion(official_tokens, init_sd, args, True, "at the start")
    grid = args.img_size // (args.patch_size or patch)
    ds = common.build_dataset(args.data, "train", conmim.ConMIMTransform(args, grid), img_size=args.img_size,
                              seed=args.seed)
    spe = len(ds) // args.batch_size
    peak = args.lr if args.lr is not None else args.blr * args.batch_size / 256
    opt_args = SimpleNamespace(opt="adamw", weight_decay=args.weight_decay, lr=peak, opt_eps=1e-8, opt_betas=[0.9, 0.98],
                               momentum=0.9)
    opt = optim_factory.create_optimizer(opt_args, model)
    if args.rel_pos_lr_mult != 1.0:  # our --rel-pos-lr-mult, through the lr_scale the official engine multiplies in
        table = model.rel_pos_bias.relative_position_bias_table
        for g in opt.param_groups:
            if any(p is table for p in g["params"]):
                g["params"] = [p for p in g["params"] if p is not table]
                opt.add_param_group({**{k: v for k, v in g.items() if k != "params"}, "params": [table],
                                     "lr_scale": args.rel_pos_lr_mult})
                break
    lr_values = utils.cosine_scheduler(peak, min(args.min_lr, peak), args.epochs, spe, warmup_epochs=args.warmup_epochs,
                                       start_warmup_value=1e-6)  # official --warmup_lr 1e-6
    wd_values = utils.cosine_scheduler(args.weight_decay, args.weight_decay, args.epochs, spe)
    momentum_values = utils.cosine_scheduler(args.momentum, args.momentum_final, args.epochs, spe)
    n_patches = grid * grid
    for epoch in range(args.epochs):
        model.train()
        model_copy.train()  # official: the copy is never put in eval mode (its projector BN uses batch statistics)
        total, t0 = 0.0, time.time()
        for step, ((samples, samples_aug, bool_masked_pos), _) in enumerate(loader(ds, args, epoch)):
            it = spe * epoch + step
            for g in opt.param_groups:  # engine_for_pretraining.train_one_epoch from here on
                g["lr"] = lr_values[it] * g.get("lr_scale", 1.0)
                if g["weight_decay"] > 0:
                    g["weight_decay"] = wd_values[it]
            bs = samples.shape[0]
            bool_masked_pos = bool_masked_pos.flatten(1).to(torch.bool)
            zero = torch.zeros(bool_masked_pos.shape, dtype=torch.bool)
            labels = torch.arange(n_patches).unsqueeze(0).expand(bs, -1)[bool_masked_pos]  # official: length = 196
            with torch.no_grad():
                feat_full = model_copy(samples_aug, bool_masked_pos=zero, return_all_tokens=True,
                                       only_return_before_head=True, use_mlp_projectors=True)
            feat = model(samples, bool_masked_pos=bool_masked_pos, return_all_tokens=True, only_return_before_head=True,
                         use_mlp_projectors=True)
            feat_full = nn.functional.normalize(feat_full, p=2, dim=-1)
            feat = nn.functional.normalize(feat, p=2, dim=-1)
            logits_ab = torch.matmul(feat, feat_full.permute(0, 2, 1)) / args.temperature
            loss = nn.CrossEntropyLoss()(logits_ab[bool_masked_pos], labels)
            if not math.isfinite(float(loss.detach())):
                raise common.UserError(f"the official ConMIM loss is {float(loss.detach())} at epoch {epoch} step {step}")
            opt.zero_grad()
            loss.backward()
            if args.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            opt.step()
            with torch.no_grad():
                m = momentum_values[it]
                q = dict(model.named_parameters())
                for name, p_k in model_copy.named_parameters():
                    if name in q:
                        p_k.data.mul_(m).add_((1 - m) * q[name].detach().data)
            total += float(loss)
        table = model.rel_pos_bias.relative_position_bias_table
        log(epoch, {"loss": total / spe, "table_absmax": float(table.detach().abs().max()), "seconds": time.time() - t0})
    sd = to_our_layout(model.state_dict())
    check_conversion(official_tokens, sd, args, True, "at the end")
    return sd, init_sd, True


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    own, ref = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("method", choices=["lut", "conmim"])
    ap.add_argument("--repo", required=True, help="a checkout of naver-ai/lut (lut) or TencentARC/ConMIM (conmim)")
    ap.add_argument("--output-dir", required=True)
    a = ap.parse_args(own)
    repo = Path(a.repo).resolve()
    want = {"lut": "models/models_lut.py", "conmim": "modeling_pretrain.py"}[a.method]
    if not (repo / want).exists():
        url = {"lut": "naver-ai/lut", "conmim": "TencentARC/ConMIM"}[a.method]
        raise common.UserError(f"{repo} has no {want}: pass --repo a checkout of https://github.com/{url}")
    script = __import__(a.method)
    args = common.parse_args(script.Args, ref + ["--output-dir", a.output_dir])
    script.validate(args)
    out = Path(a.output_dir)
    if (out / "checkpoint-last.pth").exists():
        print(f"{out / 'checkpoint-last.pth'} exists: nothing to do")
        return
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(torch.get_num_threads())
    log_file = open(out / "log.jsonl", "w")

    def log(epoch, d):
        log_file.write(json.dumps({"epoch": epoch + 1, **d}) + "\n")
        log_file.flush()
        print(f"epoch {epoch + 1}/{args.epochs}: done, " + ", ".join(f"{k} {v:.4g}" for k, v in d.items()), flush=True)

    t0 = time.time()
    sd, init_sd, rel = (train_lut if a.method == "lut" else train_conmim)(repo, args, out, log)
    log_file.close()
    meta = {"official_repo": str(repo), "official_commit": repo_commit(repo), "args": dataclasses.asdict(args)}
    save_encoder(out / "checkpoint-init.pth", init_sd, args, rel, meta)  # the official initialisation (a baseline)
    save_encoder(out / "checkpoint-last.pth", sd, args, rel, {**meta, "train_seconds": time.time() - t0})
    print(f"done: {out / 'checkpoint-last.pth'} (official {a.method} code at {repo_commit(repo)})")


if __name__ == "__main__":
    try:
        main()
    except common.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
