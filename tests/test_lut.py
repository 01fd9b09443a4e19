"""lut.py: context loss and MAE loss against hand computations, momentum schedule endpoints, the disjoint
masks of the symmetric (official) variant, the momentum update touching exactly the intended tensors,
end to end to eval_knn.py (online and --ema), torchrun with 2 processes, bit-identical resume, bad flags."""
import functools
import gc
import json
import os
import socket

import pytest
import torch
import torch.nn as nn

import common
import lut
from conftest import TINY, read_json, run_script

# tiny LUT: small decoder and heads so that a step takes well under a second on one core
SMALL = ["--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2", "--head-hidden-dim", "64",
         "--pred-hidden-dim", "64", "--head-out-dim", "32", "--warmup-epochs", "1", "--log-every", "1"]
FAST = [*TINY, "--patch-size", "8"]  # 4x4 patch grid: K = 4 visible patches at ratio 0.75
DATA = ["--data", "synthetic:32:32", "--batch-size", "16"]  # 2 optimizer steps per epoch


def test_context_loss_matches_hand_computation():
    torch.manual_seed(0)
    q, k = torch.randn(5, 7), torch.randn(5, 7)
    total = 0.0
    for i in range(5):  # explicit loops: 2 - 2 cos(q_i, k_i)
        dot = sum(float(q[i, j]) * float(k[i, j]) for j in range(7))
        nq = sum(float(q[i, j]) ** 2 for j in range(7)) ** 0.5
        nk = sum(float(k[i, j]) ** 2 for j in range(7)) ** 0.5
        total += 2 - 2 * dot / (nq * nk)
    got = lut.context_loss(q, k)
    assert abs(float(got) - total / 5) < 1e-5
    # "normalised l2 distance": || q/|q| - k/|k| ||^2, and scale invariance of both arguments
    qn, kn = q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)
    assert torch.allclose(got, ((qn - kn) ** 2).sum(1).mean(), atol=1e-6)
    assert torch.allclose(lut.context_loss(3 * q, 0.5 * k), got, atol=1e-6)
    assert float(lut.context_loss(q, q)) < 1e-6 and abs(float(lut.context_loss(q, -q)) - 4) < 1e-5


def test_mae_loss_matches_hand_computation():
    torch.manual_seed(0)
    p, B, H = 4, 2, 8
    imgs = torch.randn(B, 3, H, H)
    N = (H // p) ** 2
    pred = torch.randn(B, N, p * p * 3)
    mask = torch.zeros(B, N)
    mask[0, [0, 3]] = 1
    mask[1, [1]] = 1
    for norm_pix in (True, False):
        num, den = 0.0, 0.0
        for b in range(B):
            for n in range(N):
                i, j = divmod(n, H // p)
                # MAE patch layout: pixels (row p, col q, channel c)
                t = torch.stack([imgs[b, c, i * p + a, j * p + e] for a in range(p) for e in range(p) for c in range(3)])
                if norm_pix:
                    t = (t - t.mean()) / (t.var(unbiased=True) + 1e-6) ** 0.5
                num += float(mask[b, n]) * float(((pred[b, n] - t) ** 2).mean())
                den += float(mask[b, n])
        got = lut.mae_loss(pred, imgs, mask, p, norm_pix)
        assert abs(float(got) - num / den) < 1e-5


def test_momentum_schedule_endpoints():
    a = lut.Args()
    total = 1000  # optimizer steps; the script evaluates the schedule at step s over total - 1
    assert common.momentum_schedule(0, total - 1, a.momentum, a.momentum_final) == 0.996
    assert common.momentum_schedule(total - 1, total - 1, a.momentum, a.momentum_final) == 1.0
    mid = common.momentum_schedule((total - 1) / 2, total - 1, a.momentum, a.momentum_final)
    assert abs(mid - 0.998) < 1e-12  # half cosine: halfway at the midpoint
    vals = [common.momentum_schedule(s, total - 1, a.momentum, a.momentum_final) for s in range(total)]
    assert all(x <= y for x, y in zip(vals, vals[1:]))


@pytest.mark.parametrize("ratio", [0.75, 0.5])
def test_symmetric_masks_disjoint_visible_sets(ratio):
    torch.manual_seed(0)
    B, N = 6, 64
    K = int(N * (1 - ratio))
    keep1, ids_restore, mask1, keep2 = lut.random_masking(B, N, ratio, "cpu", symmetric=True)
    assert keep1.shape == (B, K) and keep2.shape == (B, K)
    for b in range(B):
        v1, v2 = set(keep1[b].tolist()), set(keep2[b].tolist())
        assert len(v1) == K and len(v2) == K and not (v1 & v2)  # disjoint, no duplicates
        masked = {n for n in range(N) if mask1[b, n] == 1}
        assert masked == set(range(N)) - v1 and len(masked) == N - K  # 1 = removed, exactly N - K
        assert v2 <= masked  # view 2 sees only patches that view 1 lost (official)
    # ids_restore inverts the shuffle whose first K entries are keep1 (the decoder relies on it)
    shuffled = torch.argsort(ids_restore, dim=1)
    assert torch.equal(shuffled[:, :K], keep1) and torch.equal(shuffled[:, K:2 * K], keep2)
    # the paper's one-sided variant draws no second set
    assert lut.random_masking(B, N, ratio, "cpu", symmetric=False)[3] is None


def _tiny_online():
    args = lut.Args(decoder_dim=16, decoder_depth=1, decoder_heads=2, head_hidden_dim=24, pred_hidden_dim=24,
                    head_out_dim=12)
    enc = common.create_vit("vit_t16", img_size=16, patch_size=8, depth=2)
    return lut.LUTOnline(enc, args)


def test_momentum_update_touches_exactly_the_intended_tensors():
    torch.manual_seed(0)
    online = _tiny_online()
    momentum = lut.MomentumBranch(online)
    # make online and momentum differ everywhere: perturb the online weights, and update the online head
    # BN running statistics with a train-mode forward
    with torch.no_grad():
        for p in online.parameters():
            if p.requires_grad:  # the frozen sin-cos pos_embed stays equal on both sides
                p.add_(torch.randn_like(p))
        online.head.train()
        online.head(torch.randn(8, online.encoder.dim) * 3 + 1)
    online_before = {k: v.clone() for k, v in online.state_dict().items()}
    mom_before = {k: v.clone() for k, v in momentum.state_dict().items()}
    # the momentum branch holds exactly the encoder and the head (no decoder, no predictor)
    assert set(mom_before) == {f"encoder.{k}" for k in online.encoder.state_dict()} | \
        {f"head.{k}" for k in online.head.state_dict()}
    assert not any(p.requires_grad for p in momentum.parameters())

    m = 0.9
    lut.momentum_update(momentum, online, m)

    for k, v in online.state_dict().items():  # online untouched
        assert torch.equal(v, online_before[k]), k
    changed = 0
    for k, v in momentum.state_dict().items():
        old, src = mom_before[k], online_before[k]
        if k.endswith("num_batches_tracked"):  # integer buffer: left alone
            assert torch.equal(v, old), k
            continue
        assert torch.allclose(v, m * old + (1 - m) * src, atol=1e-6, rtol=1e-6), k
        if not torch.equal(old, src):
            changed += 1
            assert not torch.equal(v, old), k
    # every parameter except the frozen pos_embed moved, and so did the BN running mean/var
    n_float = sum(1 for k, v in mom_before.items() if v.is_floating_point())
    assert changed == n_float - 1
    assert not torch.equal(momentum.head[1].running_mean, mom_before["head.1.running_mean"])
    # m = 1 is the identity
    snap = {k: v.clone() for k, v in momentum.state_dict().items()}
    lut.momentum_update(momentum, online, 1.0)
    assert all(torch.equal(v, snap[k]) for k, v in momentum.state_dict().items())


def test_forward_losses_one_sided_and_symmetric():
    """Paper default: L_bc = D(q(weak masked), k(strong full)). Official --symmetric: mean of the two
    cross-view terms, with the second view masked by the disjoint set; reconstruction of the weak view only
    (so L_mim is the same in both modes for the same noise)."""
    torch.manual_seed(0)
    online = _tiny_online().train()
    momentum = lut.MomentumBranch(online).eval()
    with torch.no_grad():
        for p in online.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    weak, strong = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    N = online.encoder.num_patches
    results = {}
    for sym in (False, True):
        torch.manual_seed(1)
        mim, bc = lut.forward_losses(online, momentum, weak, strong, N, 0.5, sym)
        torch.manual_seed(1)  # the same noise by hand
        keep1, restore, mask1, keep2 = lut.random_masking(4, N, 0.5, "cpu", sym)
        with torch.no_grad():
            k_weak, k_strong = momentum(weak), momentum(strong)
        if sym:
            mim2, q1, q2 = online(weak, keep1, restore, mask1, strong, keep2)
            expected = 0.5 * (lut.context_loss(q1, k_strong) + lut.context_loss(q2, k_weak))
        else:
            mim2, q1, q2 = online(weak, keep1, restore, mask1)
            assert q2 is None
            expected = lut.context_loss(q1, k_strong)
        assert torch.allclose(bc, expected, atol=1e-6) and torch.allclose(mim, mim2, atol=1e-6)
        results[sym] = (mim, bc)
    assert torch.allclose(results[False][0], results[True][0], atol=1e-6)  # L_mim: weak view only
    assert not torch.allclose(results[False][1], results[True][1])


def _timm_load(sd, cfg):
    from timm.models.vision_transformer import VisionTransformer
    m = VisionTransformer(img_size=cfg["img_size"], patch_size=cfg["patch_size"], embed_dim=cfg["dim"],
                          depth=cfg["depth"], num_heads=cfg["num_heads"], num_classes=0, qkv_bias=True,
                          norm_layer=functools.partial(nn.LayerNorm, eps=1e-6))
    m.load_state_dict(sd, strict=True)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """2 epochs in one go (shared by the end-to-end and the resume tests)."""
    out = tmp_path_factory.mktemp("lut_straight")
    p = run_script("lut.py", *FAST, *SMALL, *DATA, "--epochs", "2", "--output-dir", out)
    return out, p


def test_end_to_end_checkpoint_and_knn(straight_run, tmp_path):
    out, p = straight_run
    assert "global batch 16" in p.stdout and "peak lr 9.375e-06" in p.stdout  # 1.5e-4 * 16 / 256
    assert "context weight 1.0" in p.stdout  # ViT-T/S -> lambda 1.0 (Sec. 5.1.2)
    ck = torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert ck["model_is_ema"] is False and ck["epoch"] == 2 and ck["step"] == 4
    for key in ("model", "model_ema", "decoder", "head", "predictor", "head_ema", "optimizer", "encoder_config"):
        assert key in ck, key
    _timm_load(ck["model"], ck["encoder_config"])  # timm-loadable online encoder
    _timm_load(ck["model_ema"], ck["encoder_config"])
    assert not torch.equal(ck["model"]["blocks.0.attn.qkv.weight"], ck["model_ema"]["blocks.0.attn.qkv.weight"])
    logs = [json.loads(line) for line in open(out / "log.jsonl")]
    moms = [r["train/momentum"] for r in logs if "train/momentum" in r]
    assert moms[0] == 0.996 and moms[-1] == 1.0 and len(moms) == 4  # schedule endpoints in the real run
    assert all("train/loss_context" in r for r in logs if "train/loss" in r)
    for ema in (False, True):
        js = tmp_path / f"knn_{ema}.json"
        run_script("eval_knn.py", "--checkpoint", out / "checkpoint-last.pth", "--data", "synthetic:32:20",
                   *FAST, "--k", "5", "10", "--output-json", js, *(["--ema"] if ema else []))
        res = read_json(js)
        assert 0.0 <= res["top1"]["10"] <= 100.0


def test_resume_is_bit_identical(straight_run, tmp_path):
    out2, _ = straight_run
    out = tmp_path / "resumed"
    p = run_script("lut.py", *FAST, *SMALL, *DATA, "--epochs", "2", "--exit-after-epochs", "1", "--output-dir", out)
    assert "stopping" in p.stdout
    assert torch.load(out / "checkpoint-last.pth", weights_only=True)["epoch"] == 1
    p = run_script("lut.py", *FAST, *SMALL, *DATA, "--epochs", "2", "--output-dir", out)
    assert "resumed from" in p.stdout
    a = torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    b = torch.load(out2 / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert a["step"] == b["step"] == 4
    for key in ("model", "model_ema", "decoder", "head", "predictor", "head_ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}.{k}"
    p = run_script("lut.py", *FAST, *SMALL, *DATA, "--epochs", "2", "--output-dir", out)
    assert "nothing to do" in p.stdout


def test_torchrun_two_processes_symmetric(tmp_path):
    out = tmp_path / "ddp"
    p = run_script("lut.py", *FAST, *SMALL, *DATA, "--epochs", "1", "--symmetric", "--momentum-bn", "batch",
                   "--output-dir", out, nproc=2)
    assert "2 process(es)" in p.stdout and "symmetric (official)" in p.stdout
    ck = torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert ck["epoch"] == 1 and ck["step"] == 2 and ck["args"]["symmetric"] is True
    assert ck["args"]["momentum_bn"] == "batch"
    # the heads' BN gathers over the ranks (common.sync_batchnorm; the maths: the test below), so h~'s batch
    # and running statistics are the same on both ranks, and nothing warns about per-process BN
    assert "BatchNorm" not in p.stdout + p.stderr
    per_rank = ck["head_ema_buffers_per_rank"]
    assert len(per_rank) == 2 and all(torch.equal(per_rank[0][k], per_rank[1][k]) for k in per_rank[0])


def _bn_step(rank, world, weak, strong, masks):
    """One symmetric LUT step (--sync-bn, --momentum-bn batch: every BN of h, h_pred and h~ normalises with the
    batch) on this rank's rows of the global batch and of its masks; DDP-wrapped under a process group."""
    torch.manual_seed(0)
    online = common.sync_batchnorm(_tiny_online(), torch.device("cpu"))
    momentum = lut.MomentumBranch(online).eval()
    momentum.head.train()
    model = nn.parallel.DistributedDataParallel(online) if world > 1 else online
    n = weak.shape[0] // world
    sl = slice(rank * n, (rank + 1) * n)
    mine = tuple(t[sl] for t in masks)
    lut.random_masking = lambda *a, **kw: mine  # ranks draw their own masks in a run: here the global batch's
    mim, bc = lut.forward_losses(model, momentum, weak[sl], strong[sl], online.encoder.num_patches, 0.5, True)
    (mim + bc).backward()
    buffers = {**{f"online.{k}": b for k, b in online.named_buffers()},
               **{f"momentum.{k}": b for k, b in momentum.named_buffers()}}
    return {"loss": (mim + bc).detach(), "kinds": sorted({type(m).__name__ for m in online.modules()}),
            "keys": list(online.state_dict()), "buffers": buffers,
            "grads": {k: p.grad for k, p in online.named_parameters() if p.grad is not None}}, model


def _bn_worker(rank, world, port, out_dir, weak, strong, masks):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    res, model = _bn_step(rank, world, weak, strong, masks)
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    del model  # a DDP wrapper outliving its gloo group can abort the process at exit
    gc.collect()
    torch.distributed.destroy_process_group()


def test_two_processes_sync_bn_equal_one_process(tmp_path, monkeypatch):
    """common.sync_batchnorm on CPU/gloo: 2 processes with 4 image pairs each give the loss, the gradients and
    the BN running statistics (h, h_pred, h~) of 1 process with the 8 pairs and the same masks."""
    torch.manual_seed(3)
    weak, strong = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    masks = lut.random_masking(8, 4, 0.5, "cpu", True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_bn_worker, args=(2, port, str(tmp_path), weak, strong, masks), nprocs=2)
    r = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    monkeypatch.setattr(lut, "random_masking", lut.random_masking)  # _bn_step replaces it: restored after
    one, _ = _bn_step(0, 1, weak, strong, masks)
    assert "GatheredBatchNorm1d" in r[0]["kinds"] and "GatheredBatchNorm1d" not in one["kinds"]
    assert r[0]["keys"] == one["keys"]  # checkpoints load either way
    assert (r[0]["loss"] + r[1]["loss"]).item() / 2 == pytest.approx(one["loss"].item(), rel=1e-5)
    assert one["grads"].keys() == r[0]["grads"].keys() and len(one["grads"]) > 20
    for i in range(2):
        for k, g in one["grads"].items():
            torch.testing.assert_close(r[i]["grads"][k], g, rtol=1e-4, atol=1e-6, msg=k)
        assert one["buffers"]["momentum.head.1.num_batches_tracked"] == 2  # h~ ran on both views
        for k, b in one["buffers"].items():
            torch.testing.assert_close(r[i]["buffers"][k].float(), b.float(), rtol=1e-5, atol=1e-6, msg=k)


def test_momentum_bn_running_vs_batch():
    """--momentum-bn running (official): the momentum head normalises with its (EMA'd) running statistics, so
    a target does not depend on the rest of the batch; batch (BYOL): with the statistics of the batch."""
    torch.manual_seed(0)
    momentum = lut.MomentumBranch(_tiny_online())
    x = torch.randn(4, 3, 16, 16)
    other = torch.cat([x[:2], 5 * torch.randn(2, 3, 16, 16)])  # same first two images, different rest
    momentum.eval()  # running
    assert torch.allclose(momentum(x)[:2], momentum(other)[:2], atol=1e-6)
    momentum.head.train()  # batch
    assert not torch.allclose(momentum(x)[:2], momentum(other)[:2], atol=1e-3)


def test_bad_flags_one_line_error(tmp_path):
    p = run_script("lut.py", *FAST, *DATA, "--symmetric", "--mask-ratio", "0.3", "--output-dir", tmp_path / "x",
                   check=False)
    assert p.returncode == 2 and p.stderr.startswith("error:") and "--symmetric needs --mask-ratio >= 0.5" in p.stderr
    assert "Traceback" not in p.stderr
    for bad in (dict(crop="bogus"), dict(momentum_bn="sync"), dict(lr_scaling="cube"), dict(decoder_dim=30), dict(context_weight=-1.0)):
        with pytest.raises(common.UserError):  # validated before anything is built
            lut.main(lut.Args(output_dir=str(tmp_path / "y"), device="cpu", **bad))
