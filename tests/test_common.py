"""common.py: ViT equivalence with timm, token subsets / mask tokens / per-block outputs, gather with
gradient under 2 processes, schedules, parameter groups, checkpoints, data."""
import functools
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
import torch.nn as nn

import common
import synthetic
from conftest import write_image_folder


def _timm_vit(m: common.VisionTransformer):
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=m.img_size, patch_size=m.patch_size, embed_dim=m.dim, depth=m.depth,
                             num_heads=m.num_heads, num_classes=0, qkv_bias=True,
                             norm_layer=functools.partial(nn.LayerNorm, eps=1e-6)).eval()


@pytest.mark.parametrize("name,img,patch", [("vit_t16", 32, 4), ("vit_s16", 48, 16)])
def test_vit_matches_timm_both_ways(name, img, patch):
    torch.manual_seed(0)
    ours = common.create_vit(name, img_size=img, patch_size=patch).eval()
    timm_model = _timm_vit(ours)
    timm_model.load_state_dict(ours.state_dict(), strict=True)  # ours -> timm
    x = torch.randn(3, 3, img, img)
    with torch.no_grad():
        assert torch.allclose(ours.forward_features(x), timm_model.forward_features(x), atol=1e-5)
        assert torch.allclose(ours(x), timm_model(x), atol=1e-5)  # CLS after final norm
    # timm -> ours: perturb every timm tensor so that the copy is not trivially equal to our init
    with torch.no_grad():
        for p in timm_model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    fresh = common.create_vit(name, img_size=img, patch_size=patch).eval()
    fresh.load_state_dict(timm_model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(fresh.forward_features(x), timm_model.forward_features(x), atol=1e-5)


def test_pos_embed_is_mae_sincos_with_zero_cls_and_frozen():
    m = common.create_vit("vit_t16", img_size=32, patch_size=4)
    pe = m.pos_embed
    assert pe.shape == (1, 1 + 64, 192) and not pe.requires_grad
    assert torch.all(pe[0, 0] == 0)
    # token t = i*G + j: first half of channels encodes the column j, second half the row i (MAE layout)
    D, G = 192, 8
    i, j = 2, 5
    w = 1.0 / 10000 ** (torch.arange(D // 4, dtype=torch.float64) / (D / 4))
    col = torch.cat([torch.sin(j * w), torch.cos(j * w)])
    row = torch.cat([torch.sin(i * w), torch.cos(i * w)])
    assert torch.allclose(pe[0, 1 + i * G + j].double(), torch.cat([col, row]), atol=1e-6)
    assert "pos_embed" in m.state_dict()


def test_keep_idx_mask_token_and_return_blocks():
    torch.manual_seed(0)
    m = common.create_vit("vit_t16", img_size=32, patch_size=8).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # keep all patches in order == plain forward
        keep = torch.arange(16).expand(2, -1)
        assert torch.allclose(m.forward_features(x, keep_idx=keep), m.forward_features(x), atol=1e-6)
        # a subset: equals running the blocks on the gathered embedded tokens by hand
        keep = torch.stack([torch.tensor([0, 5, 9]), torch.tensor([15, 1, 2])])
        tok = m.patch_embed(x) + m.pos_embed[:, 1:]
        tok = torch.stack([tok[b, keep[b]] for b in range(2)])
        h = torch.cat([(m.cls_token + m.pos_embed[:, :1]).expand(2, -1, -1), tok], 1)
        for blk in m.blocks:
            h = blk(h)
        assert torch.allclose(m.forward_features(x, keep_idx=keep), m.norm(h), atol=1e-5)
        # mask token replaces exactly the masked patch embeddings (before positions are added)
        mask = torch.zeros(2, 16, dtype=torch.bool)
        mask[0, 3] = True
        mt = torch.randn(1, 1, 192)
        emb = m.embed(x, mask=mask, mask_token=mt)
        ref = m.embed(x)
        assert torch.allclose(emb[0, 1 + 3], mt[0, 0] + m.pos_embed[0, 1 + 3], atol=1e-6)
        assert torch.allclose(emb[:, 1:][~mask], ref[:, 1:][~mask])
        # per-block outputs: the last one, normed, equals the final features
        out, blocks = m.forward_features(x, return_blocks=[3, -1])
        assert len(blocks) == 2 and torch.allclose(m.norm(blocks[1]), out, atol=1e-6)
        assert not torch.allclose(blocks[0], blocks[1])


def test_rel_pos_bias_vit_offsets_subsets_and_errors(tmp_path):
    """BEiT position scheme: no pos_embed; the bias of two patches depends only on their offset (dy, dx);
    keep_idx slices the bias to the kept tokens (= running the blocks by hand); a rel/abs mismatch and a
    wrong resolution are one-line errors. (Numerical equivalence with timm's Beit: tests/test_conmim.py.)"""
    torch.manual_seed(0)
    m = common.create_vit("vit_t16", img_size=32, patch_size=8, rel_pos_bias=True).eval()
    assert m.pos_embed is None and "pos_embed" not in m.state_dict() and m.config()["rel_pos_bias"]
    assert set(k for k in m.state_dict() if "rel_pos" in k) == {common.REL_POS_KEY}
    with torch.no_grad():
        m.rel_pos_bias.relative_position_bias_table.normal_()
    bias = m.rel_pos_bias()  # (h, 17, 17)
    G, table = 4, m.rel_pos_bias.relative_position_bias_table
    for (y1, x1, y2, x2) in [(0, 0, 1, 2), (2, 1, 3, 3), (1, 1, 1, 1), (3, 0, 0, 3)]:
        i, j = 1 + y1 * G + x1, 1 + y2 * G + x2
        assert torch.equal(bias[:, i, j], table[(y1 - y2 + G - 1) * (2 * G - 1) + (x1 - x2 + G - 1)])
    assert torch.equal(bias[:, 1, 1], bias[:, 6, 6]) and not torch.equal(bias[:, 1, 2], bias[:, 2, 1])
    assert torch.equal(bias[:, 0, 5], table[-3]) and torch.equal(bias[:, 5, 0], table[-2]) and torch.equal(bias[:, 0, 0], table[-1])
    x = torch.randn(2, 3, 32, 32)
    keep = torch.stack([torch.tensor([0, 5, 9]), torch.tensor([15, 1, 2])])
    with torch.no_grad():
        tok = torch.stack([m.patch_embed(x)[b, keep[b]] for b in range(2)])
        h = torch.cat([m.cls_token.expand(2, -1, -1), tok], 1)
        idx = torch.cat([torch.zeros(2, 1, dtype=torch.long), keep + 1], 1)
        for blk in m.blocks:
            h = torch.stack([blk(h[b:b + 1], bias[:, idx[b]][:, :, idx[b]])[0] for b in range(2)])
        assert torch.allclose(m.forward_features(x, keep_idx=keep), m.norm(h), atol=1e-5)
    with pytest.raises(common.UserError, match="32 px only"):
        m.forward_features(torch.randn(1, 3, 16, 16))
    cfg = common.checkpoint_encoder_config(m.state_dict())
    assert cfg["rel_pos_bias"] and cfg["img_size"] == 32 and cfg["patch_size"] == 8
    with pytest.raises(common.UserError, match="relative position bias"):
        common.load_encoder(common.create_vit("vit_t16", img_size=32, patch_size=8), {"model": m.state_dict()})
    with pytest.raises(common.UserError, match="absolute position embedding"):
        common.load_encoder(m, {"model": common.create_vit("vit_t16", img_size=32, patch_size=8).state_dict()})
    with pytest.raises(common.UserError, match="--img-size 32"):
        common.load_encoder(common.create_vit("vit_t16", img_size=64, patch_size=8, rel_pos_bias=True), {"model": m.state_dict()})
    m2 = common.create_vit("vit_t16", img_size=32, patch_size=8, rel_pos_bias=True)
    common.load_encoder(m2, {"model": m.state_dict()})
    assert torch.equal(m2.rel_pos_bias(), bias)
    # gradient checkpointing passes the bias through: same gradients
    m.train()
    grads = []
    for gc in (False, True):
        m.grad_checkpointing = gc
        m.zero_grad()
        m.forward_features(x).square().mean().backward()
        grads.append(table.grad.clone())
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


def test_other_resolution_interpolates_pos_embed():
    m = common.create_vit("vit_t16", img_size=32, patch_size=4).eval()
    out = m.forward_features(torch.randn(1, 3, 16, 16))
    assert out.shape == (1, 1 + 16, 192)
    # interpolating to the same grid is the identity; to another grid keeps the CLS row
    assert torch.equal(common.resize_pos_embed(m.pos_embed, 8, 8), m.pos_embed)
    r = common.resize_pos_embed(m.pos_embed, 4, 4)
    assert r.shape == (1, 17, 192) and torch.equal(r[:, 0], m.pos_embed[:, 0])


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    a = common.create_vit("vit_t16", img_size=32, patch_size=8)
    b = common.create_vit("vit_t16", img_size=32, patch_size=8, grad_checkpointing=12)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    a.forward_features(x).square().mean().backward()
    b.forward_features(x).square().mean().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is None:
            assert pb.grad is None, n
        else:
            assert torch.allclose(pa.grad, pb.grad, atol=1e-6), n


def test_post_norm_variant_structure():
    m = common.create_vit("vit_t16", img_size=32, patch_size=8, post_norm=True).eval()
    sd = m.state_dict()
    assert "embed_norm.weight" in sd and "norm.weight" not in sd
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        h = m.embed_norm(torch.cat([(m.cls_token + m.pos_embed[:, :1]), m.patch_embed(x) + m.pos_embed[:, 1:]], 1))
        blk = m.blocks[0]
        h = blk.norm1(h + blk.attn(h))
        h = blk.norm2(h + blk.mlp(h))
        _, outs = m.forward_features(x, return_blocks=[0])
        assert torch.allclose(outs[0], h, atol=1e-6)


# ---------------------------------------------------------------------------------------------
def _gather_worker(rank, world, port, x_full, w0, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    n = x_full.shape[0] // world
    w = w0.clone().requires_grad_(True)
    z = x_full[rank * n:(rank + 1) * n] @ w                  # (n, d) this rank's "predictions"
    zall = common.all_gather_grad(z)                          # (N, d) with gradient
    logits = z @ zall.T                                       # (n, N)
    labels = torch.arange(rank * n, (rank + 1) * n)
    loss = nn.functional.cross_entropy(logits, labels)
    loss.backward()
    g = w.grad.clone()
    torch.distributed.all_reduce(g)                           # what DDP does ...
    g /= world                                                # ... averaging over ranks
    loss_mean = common.all_reduce_mean(loss.detach())
    if rank == 0:
        torch.save({"loss": loss_mean, "grad": g}, os.path.join(out_dir, "ddp.pt"))
    torch.distributed.destroy_process_group()


def test_all_gather_grad_two_processes_equal_one_process(tmp_path):
    torch.manual_seed(0)
    x, w0 = torch.randn(8, 5), torch.randn(5, 4)
    import socket
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    torch.multiprocessing.spawn(_gather_worker, args=(2, port, x, w0, str(tmp_path)), nprocs=2)
    res = torch.load(tmp_path / "ddp.pt")
    w = w0.clone().requires_grad_(True)
    z = x @ w
    loss = nn.functional.cross_entropy(z @ z.T, torch.arange(8))
    loss.backward()
    assert torch.allclose(res["loss"], loss.detach(), atol=1e-6)
    assert torch.allclose(res["grad"], w.grad, atol=1e-6)


# ---------------------------------------------------------------------------------------------
def test_cosine_schedule_and_momentum():
    f = functools.partial(common.cosine_schedule, total_steps=110, base=1.0, final=0.1, warmup_steps=10)
    assert f(0) == 0.0 and math.isclose(f(5), 0.5) and math.isclose(f(10), 1.0)
    assert math.isclose(f(60), 0.55) and math.isclose(f(110), 0.1) and math.isclose(f(500), 0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 110))
    m = functools.partial(common.momentum_schedule, total_steps=100, base=0.996)
    assert math.isclose(m(0), 0.996) and math.isclose(m(100), 1.0) and math.isclose(m(50), 0.998)


def test_param_groups_no_wd_and_layer_decay():
    m = common.create_vit("vit_t16", img_size=32, patch_size=8)
    groups = common.param_groups(m.named_parameters(), weight_decay=0.05, layer_decay=0.65, depth=12)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(m.named_parameters())
    assert id(named["pos_embed"]) not in by_param  # frozen -> not optimised
    assert by_param[id(named["cls_token"])]["weight_decay"] == 0.0
    assert by_param[id(named["blocks.3.attn.qkv.bias"])]["weight_decay"] == 0.0
    assert by_param[id(named["blocks.3.norm1.weight"])]["weight_decay"] == 0.0
    assert by_param[id(named["blocks.3.attn.qkv.weight"])]["weight_decay"] == 0.05
    # MAE util/lr_decay: stem 0.65^13, block k 0.65^(12-k), final norm 1
    assert math.isclose(by_param[id(named["patch_embed.proj.weight"])]["lr_scale"], 0.65 ** 13)
    assert math.isclose(by_param[id(named["blocks.0.mlp.fc1.weight"])]["lr_scale"], 0.65 ** 12)
    assert math.isclose(by_param[id(named["blocks.11.mlp.fc1.weight"])]["lr_scale"], 0.65)
    assert math.isclose(by_param[id(named["norm.weight"])]["lr_scale"], 1.0)
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in m.parameters())
    opt = common.make_adamw(groups, lr=2.0)
    assert {round(g["lr"] / g["lr_scale"], 9) for g in opt.param_groups} == {2.0}


def test_ema_update():
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    old = [p.clone() for p in a.parameters()]
    common.ema_update(a, b, 0.9)
    for pa, po, pb in zip(a.parameters(), old, b.parameters()):
        assert torch.allclose(pa, 0.9 * po + 0.1 * pb)


# ---------------------------------------------------------------------------------------------
def test_checkpoint_atomic_and_weights_only(tmp_path):
    path = tmp_path / "out" / "checkpoint-last.pth"
    m = common.create_vit("vit_t16", img_size=32, patch_size=8)
    common.save_checkpoint(path, {"model": common.encoder_state_dict(m), "encoder_config": m.config(),
                                  "args": {"lr": 1e-3, "k": [1, 2]}, "epoch": 3})
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint-last.pth"]  # no temp file left
    st = torch.load(path, weights_only=True)
    assert st["epoch"] == 3 and st["encoder_config"]["dim"] == 192


def test_load_encoder_formats_and_errors(tmp_path):
    torch.manual_seed(0)
    src = common.create_vit("vit_t16", img_size=32, patch_size=8).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = src.forward_features(x)
    sd = src.state_dict()
    wrapped = {"module._orig_mod." + k: v for k, v in sd.items()}
    full = {**sd, "mask_token": torch.zeros(1, 1, 8), "decoder_pred.weight": torch.zeros(4, 8)}
    maect = {**sd, "pos_embed": sd["pos_embed"][:, 1:]}
    hub = {k: v for k, v in sd.items() if k not in ("cls_token", "pos_embed")}
    hub.update({"cls_tokens.tokens": sd["cls_token"], "pos_embed.embed": sd["pos_embed"][:, 1:].reshape(1, 4, 4, -1)})
    for ck in ({"model": full}, {"state_dict": maect}, {"state_dict": hub}, wrapped):
        dst = common.create_vit("vit_t16", img_size=32, patch_size=8).eval()
        common.load_encoder(dst, ck)
        assert torch.allclose(dst.forward_features(x), ref, atol=1e-6)
    # a resolution change interpolates pos_embed
    dst = common.create_vit("vit_t16", img_size=48, patch_size=8)
    common.load_encoder(dst, {"model": sd})
    assert dst.pos_embed.shape == (1, 37, 192)
    # wrong architecture -> one line naming both
    small = common.create_vit("vit_s16", img_size=32, patch_size=8)
    with pytest.raises(common.UserError, match=r"dim 192.*but the model is vit_s16|dim 192.*dim 384"):
        common.load_encoder(small, {"model": sd})
    with pytest.raises(common.UserError, match="no EMA"):
        common.load_encoder(dst, {"model": sd}, ema=True)
    with pytest.raises(common.UserError, match="does not exist"):
        common.load_encoder(dst, str(tmp_path / "nope.pth"))


def test_data2vec2_key_mapping():
    torch.manual_seed(0)
    src = common.create_vit("vit_t16", img_size=32, patch_size=8, post_norm=True).eval()
    sd = src.state_dict()
    pre = "model.modality_encoders.IMAGE."
    ren = {"patch_embed.proj.": "local_encoder.proj.", "embed_norm.": "context_encoder.norm."}
    fair = {}
    for k, v in sd.items():
        if k == "cls_token":
            fair[pre + "extra_tokens"] = v
        elif k == "pos_embed":
            fair[pre + "fixed_positional_encoder.positions"] = v[:, 1:]
        else:
            for a, b in ren.items():
                if k.startswith(a):
                    k = b + k[len(a):]
            fair[("model." if k.startswith("blocks.") else pre) + k] = v  # fairseq data2vec2.py: blocks at the top
    fair["model.modality_encoders.IMAGE.decoder.blocks.0.weight"] = torch.zeros(3)
    fair["_ema"] = torch.zeros(1)
    dst = common.create_vit("vit_t16", img_size=32, patch_size=8, post_norm=True).eval()
    common.load_encoder(dst, {"model": common.clean_state_dict({k.replace("model.", "", 1): v for k, v in fair.items()})})
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(dst.forward_features(x), src.forward_features(x), atol=1e-6)


# ---------------------------------------------------------------------------------------------
def test_synthetic_dataset_deterministic_and_balanced():
    a = synthetic.SyntheticShapes(30, img_size=24, seed=1)
    b = synthetic.SyntheticShapes(30, img_size=24, seed=1)
    c = synthetic.SyntheticShapes(30, img_size=24, seed=2)
    import numpy as np
    assert np.array_equal(np.array(a[7][0]), np.array(b[7][0]))
    assert not np.array_equal(np.array(a[7][0]), np.array(c[7][0]))
    assert a[7][0].size == (24, 24) and sorted(set(a.targets)) == list(range(10))
    assert synthetic.parse_synthetic("synthetic:100:20") == (100, 20) and synthetic.parse_synthetic("x") is None


def test_build_dataset_layouts_and_errors(tmp_path):
    root = write_image_folder(tmp_path / "d", classes=("a", "b"), per_class=2)
    assert len(common.build_dataset(str(root), "train", None, require_labels=True)) == 4
    flat = tmp_path / "flat"
    flat.mkdir()
    import shutil
    for i, p in enumerate((root / "train" / "a").iterdir()):
        shutil.copy(p, flat / f"{i}.png")
    ds = common.build_dataset(str(flat), "train", None)
    assert len(ds) == 2 and ds[0][1] == -1
    with pytest.raises(common.UserError, match="kNN evaluation needs .* one subfolder per class"):
        common.build_dataset(str(flat), "train", None, require_labels=True)
    (tmp_path / "flat2").mkdir()
    shutil.copytree(flat, tmp_path / "flat2" / "train")
    assert len(common.build_dataset(str(tmp_path / "flat2"), "train", None)) == 2
    with pytest.raises(common.UserError, match="no class subfolders"):
        common.build_dataset(str(tmp_path / "flat2"), "train", None, require_labels=True)
    with pytest.raises(common.UserError, match="does not exist"):
        common.build_dataset(str(tmp_path / "missing"), "train", None)
    (root / "train" / "empty").mkdir()
    with pytest.raises(common.UserError, match="empty"):
        common.build_dataset(str(root), "train", None)
    (root / "train" / "empty").rmdir()
    (root / "train" / "a" / "0.png").write_bytes(b"not an image")
    ds = common.build_dataset(str(root), "train", None)
    with pytest.raises(common.UserError, match="cannot read image"):
        ds[0]


def test_per_rank_batch_and_parse_args():
    assert common.per_rank_batch(64, 2, 2) == 16
    with pytest.raises(common.UserError, match="not divisible"):
        common.per_rank_batch(10, 1, 4)

    @dataclass
    class A:
        batch_size: int = 8
        """global batch"""
        lr: Optional[float] = None
        """absolute lr"""
        k: list[int] = field(default_factory=lambda: [1, 2])
        """neighbours"""
        flag: bool = True
        """a switch"""

    a = common.parse_args(A, ["--batch-size", "4", "--lr", "0.5", "--k", "3", "4", "5", "--no-flag"])
    assert a == A(4, 0.5, [3, 4, 5], False)
    assert common.parse_args(A, ["--lr", "none"]).lr is None
    assert common._field_docs(A)["batch_size"] == "global batch"


def test_speed_ups_compute_what_the_plain_code_did():
    """q, k, v by unbind (views) instead of indexing: the same outputs and gradients bit for bit; the EMA with one
    foreach lerp: the loop's values bit for bit; fused AdamW: the per-tensor loop's update to fp32 rounding."""
    torch.manual_seed(0)
    attn = common.Attention(32, 4)
    x = torch.randn(2, 5, 32, requires_grad=True)

    def indexed(x):  # the former forward
        B, N, D = x.shape
        qkv = attn.qkv(x).reshape(B, N, 3, 4, D // 4).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return attn.proj(y.transpose(1, 2).reshape(B, N, D))
    outs = []
    for f in (attn, indexed):
        attn.zero_grad()
        x.grad = None
        y = f(x)
        y.square().sum().backward()
        outs.append([y.detach(), x.grad.clone(), *[p.grad.clone() for p in attn.parameters()]])
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    ema, online = common.create_vit("vit_t16", 32, 8), common.create_vit("vit_t16", 32, 8)
    want = [pe.detach().clone().lerp_(po.detach(), 0.01) for pe, po in zip(ema.parameters(), online.parameters())]
    common.ema_update(ema, online, 0.99)
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), want))
    params = [[p.detach().clone().requires_grad_() for p in online.parameters()] for _ in range(2)]
    opts = [common.make_adamw([{"params": params[0]}], 1e-3),
            torch.optim.AdamW([{"params": params[1]}], 1e-3, betas=(0.9, 0.95), foreach=False)]
    assert opts[0].defaults["fused"]
    for _ in range(3):
        g = [torch.randn_like(p) for p in params[0]]
        for ps, opt in zip(params, opts):
            for p, gi in zip(ps, g):
                p.grad = gi.clone()
            opt.step()
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
