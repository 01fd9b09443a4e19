"""conmim.py: Eq. (3) against explicit loops, the masking generators, the shared-geometry transform, the
momentum schedule, end to end to eval_knn.py (online and --ema), torchrun with 2 processes, resume."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

import common
import synthetic
import conmim
from conftest import ONE_THREAD as ONE, TINY, read_json, run_script

# tiny ConMIM: patch 8 -> a 4x4 patch grid (2x2 masking cells, 3 of 4 masked), small projector
FAST = [*TINY, "--patch-size", "8"]
SMALL = [*FAST, "--head-hidden-dim", "32", "--head-out-dim", "16", "--warmup-epochs", "1", "--log-every", "1"]


# ------------------------------------------------------------------------------------------------ loss
def _loss_by_loops(q, k, mask, tau):
    """Eq. (3) written out: for every masked position j of image b, -log softmax over the N keys of
    image b (cosine / tau) at the key j."""
    total, count = 0.0, 0
    B, N, _ = q.shape
    for b in range(B):
        for j in range(N):
            if not mask[b, j]:
                continue
            qj = q[b, j] / q[b, j].norm()
            logits = [float(qj @ (k[b, i] / k[b, i].norm())) / tau for i in range(N)]
            mx = max(logits)
            lse = mx + math.log(sum(math.exp(v - mx) for v in logits))
            total += lse - logits[j]
            count += 1
    return total, count


def test_patch_infonce_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    B, N, C, tau = 3, 7, 5, 0.1
    q, k = torch.randn(B, N, C, generator=g, dtype=torch.float64), torch.randn(B, N, C, generator=g, dtype=torch.float64)
    mask = torch.rand(B, N, generator=g) < 0.6
    mask[:, 0] = True  # at least one masked query per image
    loss_sum, n = conmim.conmim_loss(q, k, mask, tau)
    ref, ref_n = _loss_by_loops(q, k, mask, tau)
    assert int(n) == ref_n == int(mask.sum())
    assert abs(float(loss_sum) - ref) < 1e-4 * max(1.0, abs(ref))
    # positives on the diagonal: keys equal to the queries (scaled) give a much lower loss than shuffled keys
    aligned, _ = conmim.conmim_loss(q, 3.0 * q, mask, tau)
    shuffled, _ = conmim.conmim_loss(q, (3.0 * q).roll(1, dims=1), mask, tau)
    assert float(aligned) < float(shuffled)


def test_patch_infonce_negatives_within_image_and_masked_positions_only():
    g = torch.Generator().manual_seed(1)
    B, N, C = 2, 6, 4
    q, k = torch.randn(B, N, C, generator=g), torch.randn(B, N, C, generator=g)
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[0, [1, 4]] = True
    mask[1, [0, 2, 5]] = True
    base, _ = conmim.conmim_loss(q, k, mask, 0.1)
    # changing queries at unmasked positions changes nothing
    q2 = q.clone()
    q2[~mask] = torch.randn(int((~mask).sum()), C, generator=g)
    assert torch.allclose(conmim.conmim_loss(q2, k, mask, 0.1)[0], base)
    # image 1's keys are not negatives of image 0: the per-image loss of image 0 is unchanged
    k2 = k.clone()
    k2[1] = torch.randn(N, C, generator=g)
    l0 = conmim.conmim_loss(q[:1], k[:1], mask[:1], 0.1)[0]
    l0_new = conmim.conmim_loss(q2[:1], k2[:1], mask[:1], 0.1)[0]
    assert torch.allclose(l0, l0_new)
    # ... while image 0's unmasked keys ARE negatives (changing one changes the loss)
    k3 = k.clone()
    k3[0, 0] = torch.randn(C, generator=g)
    assert not torch.allclose(conmim.conmim_loss(q, k3, mask, 0.1)[0], base)
    # the gradient reaches only masked queries
    qg = q.clone().requires_grad_(True)
    conmim.conmim_loss(qg, k, mask, 0.1)[0].backward()
    assert torch.all(qg.grad[~mask] == 0) and torch.all(qg.grad[mask].abs().sum(-1) > 0)


# ------------------------------------------------------------------------------------------------ masks
@pytest.mark.parametrize("grid,block,ratio", [(8, 2, 0.75), (14, 2, 0.75), (14, 1, 0.75), (8, 4, 0.5)])
def test_grid_mask_ratio_blocks_and_seed(grid, block, ratio):
    cells = (grid // block) ** 2
    expected = math.ceil(cells * ratio) * block * block  # official: ceil(49*0.75)=37 cells -> 148 of 196
    for seed in range(5):
        m = conmim.grid_mask(grid, ratio, block, torch.Generator().manual_seed(seed))
        assert m.shape == (grid * grid,) and m.dtype == torch.bool
        assert int(m.sum()) == expected
        cellwise = m.view(grid // block, block, grid // block, block).permute(0, 2, 1, 3).reshape(cells, -1)
        assert torch.all(cellwise.all(-1) | ~cellwise.any(-1))  # every aligned block all-or-nothing
    a = conmim.grid_mask(grid, ratio, block, torch.Generator().manual_seed(3))
    b = conmim.grid_mask(grid, ratio, block, torch.Generator().manual_seed(3))
    c = conmim.grid_mask(grid, ratio, block, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    if (grid, block) == (14, 2):
        assert expected == 148


def _boundary(m, grid):
    m = m.view(grid, grid).int()
    return int((m[1:] != m[:-1]).sum() + (m[:, 1:] != m[:, :-1]).sum())


def test_beit_block_mask_count_blockiness_and_seed():
    grid, target = 14, 75  # BEiT / official ConMIM parser default
    counts, bd_block, bd_rand = [], [], []
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        m = conmim.beit_block_mask(grid, target, 16, 0.3, generator=g)
        assert m.shape == (grid * grid,) and int(m.sum()) <= target
        counts.append(int(m.sum()))
        bd_block.append(_boundary(m, grid))
        r = torch.zeros(grid * grid, dtype=torch.bool)
        r[torch.randperm(grid * grid, generator=g)[:int(m.sum())]] = True
        bd_rand.append(_boundary(r, grid))
    assert np.mean(counts) >= 0.9 * target
    assert np.mean(bd_block) < 0.5 * np.mean(bd_rand)  # contiguous blocks have far less boundary
    a = conmim.beit_block_mask(grid, target, generator=torch.Generator().manual_seed(7))
    b = conmim.beit_block_mask(grid, target, generator=torch.Generator().manual_seed(7))
    c = conmim.beit_block_mask(grid, target, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------------------------------------ data
def test_transform_shares_geometry_and_is_asymmetric():
    img = Image.fromarray(synthetic.SyntheticShapes(1, img_size=40).render(0)[0])
    args = conmim.Args(img_size=32, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)
    torch.manual_seed(0)
    weak, strong, mask = conmim.ConMIMTransform(args, grid=8)(img)
    assert weak.shape == strong.shape == (3, 32, 32) and mask.shape == (64,) and int(mask.sum()) == 48
    assert torch.equal(weak, strong)  # no photometric aug -> the same crop/flip gives identical inputs
    args = conmim.Args(img_size=32, jitter_p=1.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)
    torch.manual_seed(0)
    weak2, strong2, _ = conmim.ConMIMTransform(args, grid=8)(img)
    assert torch.equal(weak2, weak) and not torch.equal(strong2, weak2)  # only the full view is distorted


def test_momentum_schedule_cosine_0996_to_1():
    T_ = 100
    assert common.momentum_schedule(0, T_, 0.996) == pytest.approx(0.996)
    assert common.momentum_schedule(50, T_, 0.996) == pytest.approx(0.998)
    assert common.momentum_schedule(T_, T_, 0.996) == pytest.approx(1.0)
    vals = [common.momentum_schedule(s, T_, 0.996) for s in range(T_ + 1)]
    assert all(b >= a for a, b in zip(vals, vals[1:]))


# ------------------------------------------------------------------------------------------------ end to end
def _knn(ckpt, tmp_path, name, *extra):
    """eval_knn.py on the checkpoint; returns its JSON."""
    out = tmp_path / f"{name}.json"
    run_script("eval_knn.py", "--checkpoint", ckpt, "--data", "synthetic:32:32", *FAST, "--k", "10", "20",
               "--output-json", out, *extra, env=ONE)
    res = read_json(out)
    assert 0.0 <= res["top1"]["10"] <= 100.0 and "protocol" in res
    return res


def test_end_to_end_knn_and_resume(tmp_path):
    common_args = [*SMALL, "--data", "synthetic:32:16", "--batch-size", "16"]
    straight = tmp_path / "straight"
    p = run_script("conmim.py", *common_args, "--epochs", "2", "--output-dir", straight, env=ONE)
    assert "global batch 16" in p.stdout and "peak lr" in p.stdout
    ck = torch.load(straight / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert ck["epoch"] == 2 and ck["step"] == 4 and ck["model_is_ema"] is False
    assert ck["mask_token"].shape == (1, 1, 192) and ck["encoder_config"]["patch_size"] == 8
    assert set(ck) >= {"model", "model_ema", "head", "head_ema", "optimizer", "encoder_config", "args"}
    assert any(not torch.equal(ck["model"][k], ck["model_ema"][k]) for k in ck["model"])  # teacher lags
    # the logged momentum follows the cosine schedule 0.996 -> 1 over the 4 optimizer steps
    logs = [r for r in map(__import__("json").loads, open(straight / "log.jsonl")) if "train/momentum" in r]
    for r in logs:
        s = r["step"] - 1  # momentum used at the update of step s (0-based)
        assert r["train/momentum"] == pytest.approx(1 - 0.004 * (1 + math.cos(math.pi * s / 4)) / 2)
        assert r["train/masked_frac"] == pytest.approx(0.75)  # 3 of the 4 2x2 cells of the 4x4 grid
    # kNN on the online encoder ("model") and the momentum encoder (--ema): different weights, both evaluated
    online = _knn(straight / "checkpoint-last.pth", tmp_path, "online")
    ema = _knn(straight / "checkpoint-last.pth", tmp_path, "ema", "--ema")
    assert "ema" in str(ema["protocol"]).lower() or online["protocol"] != ema["protocol"]
    # resume: killed after 1 of 2 epochs, then the same command continues from the checkpoint
    resumed = tmp_path / "resumed"
    p = run_script("conmim.py", *common_args, "--epochs", "2", "--exit-after-epochs", "1", "--output-dir", resumed, env=ONE)
    assert "stopping" in p.stdout
    assert torch.load(resumed / "checkpoint-last.pth", weights_only=True)["epoch"] == 1
    p = run_script("conmim.py", *common_args, "--epochs", "2", "--output-dir", resumed, env=ONE)
    assert "resumed from" in p.stdout
    ck2 = torch.load(resumed / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    for key in ("model", "model_ema", "head", "head_ema"):
        assert ck[key].keys() == ck2[key].keys()
        for k in ck[key]:
            assert torch.equal(ck[key][k], ck2[key][k]), (key, k)
    assert torch.equal(ck["mask_token"], ck2["mask_token"])
    # a finished run relaunched does nothing; relaunched with the other backbone: a one-line refusal
    p = run_script("conmim.py", *common_args, "--epochs", "2", "--output-dir", resumed, env=ONE)
    assert "nothing to do" in p.stdout
    p = run_script("conmim.py", *common_args, "--epochs", "2", "--pos-embed", "abs", "--output-dir", resumed, check=False, env=ONE)
    assert p.returncode == 2 and "--pos-embed rel" in p.stderr and "Traceback" not in p.stderr


def test_rel_pos_backbone_matches_timm_beit_and_abs_option(tmp_path):
    """The default backbone (--pos-embed rel) is BEiT's: after timm_beit_state_dict it loads strictly into timm's
    Beit and computes the same features; --pos-embed abs trains the plain timm ViT layout."""
    from timm.models.beit import Beit
    torch.manual_seed(0)
    ours = common.create_vit("vit_t16", img_size=32, patch_size=4, depth=2, rel_pos_bias=True).eval()
    with torch.no_grad():  # non-trivial bias table and qkv biases (the key bias must cancel)
        ours.rel_pos_bias.relative_position_bias_table.normal_()
        for blk in ours.blocks:
            blk.attn.qkv.bias.normal_()
    ref = Beit(img_size=32, patch_size=4, embed_dim=192, depth=2, num_heads=3, num_classes=0, global_pool="token",
               use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True, init_values=None).eval()
    ref.load_state_dict(conmim.timm_beit_state_dict(ours.state_dict()), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours.forward_features(x), ref.forward_features(x), atol=1e-5)
        assert torch.allclose(ours(x), ref(x), atol=1e-5)  # CLS after the final norm
    out = tmp_path / "abs"
    run_script("conmim.py", *SMALL, "--data", "synthetic:32:16", "--batch-size", "16", "--epochs", "1",
               "--pos-embed", "abs", "--output-dir", out, env=ONE)
    ck = torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert "pos_embed" in ck["model"] and common.REL_POS_KEY not in ck["model"]
    assert ck["encoder_config"]["rel_pos_bias"] is False


def test_mask_tokens_identical_until_the_rel_pos_bias_breaks_symmetry():
    """The docstring's mechanism: with --pos-embed rel and a zero bias table (BEiT's init) every masked position
    leaves the encoder with the same output, so Eq. (3) cannot rank its keys (loss >= log N on average); any
    non-zero table makes the masked outputs position-dependent."""
    torch.manual_seed(0)
    enc = common.create_vit("vit_t16", img_size=32, patch_size=8, depth=2, rel_pos_bias=True).eval()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, [0, 5, 6, 15]] = True
    tok = torch.randn(1, 1, 192)
    with torch.no_grad():
        z = enc.forward_features(x, mask=mask, mask_token=tok)[:, 1:][mask].view(2, 4, 192)  # masked outputs
        assert torch.allclose(z, z[:, :1].expand_as(z), atol=1e-5)  # identical within each image
        enc.rel_pos_bias.relative_position_bias_table.normal_()
        z = enc.forward_features(x, mask=mask, mask_token=tok)[:, 1:][mask].view(2, 4, 192)
        assert (z - z[:, :1]).abs().amax() > 1e-2


def test_rel_pos_lr_mult_scales_the_bias_table_steps(tmp_path):
    """--rel-pos-lr-mult: Adam moves each table entry by about lr x mult per step, so after the same steps the
    logged max |bias| grows about mult-fold."""
    absmax, weights = {}, {}
    for mult in (1, 10):
        out = tmp_path / f"m{mult}"
        run_script("conmim.py", *SMALL, "--data", "synthetic:32:16", "--batch-size", "16", "--epochs", "1",
                   "--warmup-epochs", "0", "--rel-pos-lr-mult", mult, "--output-dir", out, env=ONE)
        logs = [r for r in map(__import__("json").loads, open(out / "log.jsonl")) if "train/rel_pos_bias_absmax" in r]
        absmax[mult] = logs[0]["train/rel_pos_bias_absmax"]  # after step 1 (--log-every 1)
        weights[mult] = torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=True)["model"]
    assert 0 < absmax[1] and 7 < absmax[10] / absmax[1] < 13
    assert not torch.equal(weights[1][common.REL_POS_KEY], weights[10][common.REL_POS_KEY])


def test_torchrun_two_processes_equal_one_and_frozen_momentum_encoder(tmp_path):
    """2 processes under torchrun (gloo) equal 1 process on the same global batches (the masks and crops are
    drawn per sample, the projector BN of both branches gathers over the ranks: common.sync_batchnorm): the
    logged losses and the BN running statistics; the weights move by AdamW's ~lr steps, which sign noise in
    near-zero gradients (the encoder's final-norm bias feeds a BN) blurs, so they are not compared. With
    alpha = 1 throughout, the momentum encoder must stay exactly the initial weights while the online one trains."""
    out = tmp_path / "ddp"
    flags = [*SMALL, "--data", "synthetic:32:16", "--batch-size", "16", "--epochs", "1", "--momentum", "1",
             "--momentum-final", "1"]
    p = run_script("conmim.py", *flags, "--output-dir", out, nproc=2)
    assert "2 process(es)" in p.stdout and "8 per rank" in p.stdout and "per process" not in p.stdout + p.stderr
    run_script("conmim.py", *flags, "--output-dir", tmp_path / "one", env=ONE)
    losses = [[r["train/loss"] for r in map(__import__("json").loads, open(d / "log.jsonl")) if "train/loss" in r]
              for d in (out, tmp_path / "one")]
    assert len(losses[1]) == 2 and losses[0] == pytest.approx(losses[1], rel=1e-5)
    ck = torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    one = torch.load(tmp_path / "one" / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    for key in ("head", "head_ema"):  # online and momentum projector: running statistics of the global batches
        assert ck[key].keys() == one[key].keys()
        for k in (k for k in one[key] if "running" in k or "num_batches" in k):
            torch.testing.assert_close(ck[key][k], one[key][k], rtol=1e-5, atol=1e-6, msg=f"{key}.{k}")
    common.seed_everything(0)
    init = common.create_vit("vit_t16", img_size=32, patch_size=8, rel_pos_bias=True).state_dict()
    for k, v in init.items():
        assert torch.equal(ck["model_ema"][k], v), k
    assert not torch.equal(ck["model"]["blocks.0.attn.qkv.weight"], init["blocks.0.attn.qkv.weight"])
    assert ck["step"] == 2


@pytest.mark.parametrize("flags,msg", [(["--mask-block", "3"], "--mask-block 3"), (["--pos-embed", "sincos"], "--pos-embed"),
                                       (["--batch-size", "64", "--data", "synthetic:32:16"], "fewer than one global batch"),
                                       (["--pos-embed", "abs", "--rel-pos-lr-mult", "10"], "--pos-embed rel"),
                                       (["--rel-pos-lr-mult", "0"], "--rel-pos-lr-mult 0.0: must be > 0")])
def test_bad_flags_one_line_error(tmp_path, flags, msg):
    p = run_script("conmim.py", *SMALL, "--output-dir", tmp_path / "bad", *flags, check=False, env=ONE)
    assert p.returncode == 2 and p.stderr.startswith("error:") and msg in p.stderr
    assert "Traceback" not in p.stderr
