"""mim_refiner.py: NNA loss vs explicit loops, 2 ranks == 1 rank (loss, gradients, SyncBN, queue), queue FIFO and
self-exclusion, head placement, LLRD, local crop sizes, end to end (+ eval_knn.py), torchrun x2, exact resume."""
import json
import math
import os
import socket

import pytest
import torch
import torch.nn as nn

import common
import foreign
import synthetic
import mim_refiner as mr
from conftest import TINY, read_json, run_script, write_mae_release_checkpoint


# ---------------------------------------------------------------------------------------------
def hand_nna_loss(z_global, nn_global, p, tau, official=False):
    """Eq. 1 as the official loss computes it, with explicit loops over pairs, rows and columns."""
    n = z_global.shape[0] // 2
    V = p.shape[0] // n
    unit = lambda v: v / math.sqrt(sum(float(a) ** 2 for a in v))  # noqa: E731
    dot = lambda a, b: sum(float(x) * float(y) for x, y in zip(a, b))  # noqa: E731
    pre = [[unit(z_global[i * n + b]) for b in range(n)] for i in range(2)]
    post = [[unit(nn_global[i * n + b]) for b in range(n)] for i in range(2)]
    pred = [[unit(p[v * n + c]) for c in range(n)] for v in range(V)]
    pairs = [(0, 1), (1, 0)]
    for i in (0, 1):
        for l in range(V - 2):
            pairs.append((i, l if official else 2 + l))
    terms = []
    for i, j in pairs:
        rows = []
        for b in range(n):
            num = math.exp(dot(post[i][b], pred[j][b]) / tau)
            den = num + sum(math.exp(dot(pre[i][b], pred[j][c]) / tau) for c in range(n) if c != b)
            rows.append(-math.log(num / den))
        terms.append(sum(rows) / n)
    return sum(terms) / len(terms)


@pytest.mark.parametrize("official", [False, True])
def test_nna_loss_matches_explicit_loops(official):
    torch.manual_seed(0)
    n, V, d = 5, 5, 7
    z, nn_, p = torch.randn(2 * n, d), torch.randn(2 * n, d), torch.randn(V * n, d)
    got = mr.nna_loss(z, nn_, p, 0.3, official_local_indexing=official)
    assert math.isclose(got.item(), hand_nna_loss(z, nn_, p, 0.3, official), rel_tol=1e-5)
    # the paper's and the official local indexing really differ (trap #1), and only through the local terms
    other = mr.nna_loss(z, nn_, p, 0.3, official_local_indexing=not official)
    assert abs(other.item() - got.item()) > 1e-3
    assert math.isclose(mr.nna_loss(z, nn_, p[:2 * n], 0.3, official_local_indexing=official).item(),
                        hand_nna_loss(z, nn_, p[:2 * n], 0.3), rel_tol=1e-5)
    assert mr.view_pairs(4) == [(0, 1), (1, 0), (0, 2), (0, 3), (1, 2), (1, 3)]
    assert mr.view_pairs(4, True) == [(0, 1), (1, 0), (0, 0), (0, 1), (1, 0), (1, 1)]


# ---------------------------------------------------------------------------------------------
def _step(rank, world, x, ids, labels, n, state):
    """One refiner step on this rank's images x (V, n_rank, D_in): linear 'encoder' + ID head (+BN) +
    queue lookup/enqueue + loss + backward. Returns loss, grads, BN running stats, queue contents."""
    torch.manual_seed(0)
    enc = nn.Linear(x.shape[-1], 6)
    head = mr.IDHead(6, hidden=12, out_dim=5, pred_hidden=10)
    enc.load_state_dict(state["enc"])
    head.load_state_dict(state["head"])
    queue = mr.NNQueue(16, 5)
    queue.load_state_dict(state["queue"])
    head = common.sync_batchnorm(head, torch.device("cpu"))  # GatheredBatchNorm1d under 2 ranks, plain BN in one
    f = enc(x.reshape(-1, x.shape[-1]))  # (V*n, 6) view-major [g0; g1; l0; ...]
    z, p = head(f)
    loss, _, _ = mr.refiner_loss([(z, p)], nn.ModuleList([queue]), ids, labels, n, topk=1, temperature=0.2,
                                 rank=rank, official_local_indexing=False, exclude_self=True)
    loss.backward()
    grads = [q.grad.clone() for q in list(enc.parameters()) + list(head.parameters())]
    if world > 1:  # what DDP does: average the gradients over ranks
        for g in grads:
            torch.distributed.all_reduce(g)
            g /= world
        loss = common.all_reduce_mean(loss.detach())
    return dict(loss=loss.detach(), grads=grads, bn=[b.clone() for b in head.buffers()], queue=queue.state_dict())


def _ddp_worker(rank, world, port, x, ids, labels, state, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    n = x.shape[1] // world
    sl = slice(rank * n, (rank + 1) * n)
    res = _step(rank, world, x[:, sl], ids[sl], labels[sl], n, state)
    if rank == 0:
        torch.save(res, os.path.join(out_dir, "ddp.pt"))
    torch.distributed.destroy_process_group()


def test_two_ranks_half_batch_equal_one_rank_full_batch(tmp_path):
    """Gathered negatives (labels offset by rank*n), SyncBN over all ranks and all views, one global queue:
    2 processes with 4 images each give the loss, gradients, BN statistics and queue of 1 process with 8."""
    torch.manual_seed(1)
    V, N, D = 4, 8, 9
    x = torch.randn(V, N, D)
    ids, labels = torch.arange(100, 100 + N), torch.arange(N) % 3
    torch.manual_seed(0)
    enc, head, queue = nn.Linear(D, 6), mr.IDHead(6, hidden=12, out_dim=5, pred_hidden=10), mr.NNQueue(16, 5)
    queue.ids[:4] = torch.tensor([100, 101, 102, 103])  # some entries are the samples themselves (excluded)
    state = dict(enc=enc.state_dict(), head=head.state_dict(), queue=queue.state_dict())
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, x, ids, labels, state, str(tmp_path)), nprocs=2)
    two = torch.load(tmp_path / "ddp.pt")
    one = _step(0, 1, x, ids, labels, N, state)
    assert torch.allclose(two["loss"], one["loss"], atol=1e-5)
    for a, b in zip(two["grads"], one["grads"]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    for a, b in zip(two["bn"], one["bn"]):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)
    for k in one["queue"]:
        assert torch.allclose(two["queue"][k].float(), one["queue"][k].float(), atol=1e-6), k
    assert one["queue"]["ptr"].item() == N and torch.equal(one["queue"]["ids"][:N], ids)


# ---------------------------------------------------------------------------------------------
def test_queue_fifo_wraparound_and_nn_with_self_exclusion():
    q = mr.NNQueue(5, 3)
    assert q.x.std() > 0.5 and (q.ids == -1).all()  # randn init, no ids
    for start in (0, 3, 6):  # writes of 3 rows: [0,1,2], [3,4 | 0], [1,2,3]
        rows = torch.arange(start, start + 3).float()[:, None].expand(3, 3)
        q.enqueue(rows.clone(), torch.arange(start, start + 3), torch.arange(start, start + 3) % 2)
    assert q.ids.tolist() == [5, 6, 7, 8, 4] and q.ptr.item() == 4
    assert q.x[:, 0].tolist() == [5, 6, 7, 8, 4] and q.labels.tolist() == [1, 0, 1, 0, 0]
    q.enqueue(torch.zeros(7, 3), torch.arange(20, 27), torch.zeros(7, dtype=torch.long))  # longer than the queue
    assert q.ids.tolist() == [26, 22, 23, 24, 25] and q.ptr.item() == 1  # as if written one by one from ptr 4
    # NN lookup: cosine similarity, own dataset id excluded
    q = mr.NNQueue(4, 2)
    q.x.copy_(torch.tensor([[1.0, 0.0], [0.0, 5.0], [3.0, 3.1], [-1.0, 0.0]]))
    q.ids.copy_(torch.tensor([10, 11, 12, 13]))
    z = torch.tensor([[2.0, 0.1], [2.0, 0.1], [0.1, 1.0]])
    vec, pos = q.lookup(z, torch.tensor([99, 10, 99]), topk=1)
    assert pos.tolist() == [0, 2, 1] and torch.equal(vec[1], q.x[2])  # row 1 may not pick its own entry 0
    assert q.lookup(z, None, topk=1)[1].tolist() == [0, 0, 1]  # Eq. 2 default: the whole queue
    torch.manual_seed(0)
    picks = {tuple(q.lookup(z[:1].expand(200, 2), torch.full((200,), 99), topk=2)[1].unique().tolist())}
    assert picks == {(0, 2)}  # random top-2 draws both of the 2 nearest, never the others


# ---------------------------------------------------------------------------------------------
def _resolved(model, **kw):
    return mr.resolve_args(mr.Args(model=model, **kw), post_norm=False)


def test_head_placement_per_model_and_final_norm():
    assert _resolved("vit_l16").head_blocks == list(range(16, 24))  # App. A.1: last 8 of 24
    assert _resolved("vit_h14").head_blocks == list(range(20, 32))  # last 12 of 32
    a = _resolved("vit_2b14")
    assert a.head_blocks == list(range(16, 24)) and a.freeze_blocks == 6 and a.temperature == 0.35
    assert (_resolved("vit_h14").temperature, _resolved("vit_l16").temperature) == (0.3, 0.2)
    assert (_resolved("vit_h14").batch_size, _resolved("vit_l16").batch_size) == (512, 1024)
    assert (_resolved("vit_h14").epochs, mr.resolve_args(mr.Args(model="vit_h14"), post_norm=True).epochs) == (30, 20)
    assert _resolved("vit_t16").head_blocks == [8, 9, 10, 11]
    assert _resolved("vit_t16", head_blocks=[-1, 5]).head_blocks == [11, 5]
    with pytest.raises(common.UserError):
        _resolved("vit_t16", head_blocks=[12])
    # the last block's head reads the final-norm output, the others the raw residual stream
    torch.manual_seed(0)
    enc = common.create_vit("vit_t16", img_size=32, patch_size=8)
    with torch.no_grad():
        enc.norm.weight.mul_(3.0)  # make the final norm visible
    m = mr.Refiner(enc, [5, 11], hidden=8, out_dim=4, pred_hidden=8)
    x = torch.randn(2, 3, 32, 32)
    f5, f11 = m.features(x)
    h = enc.embed(x)
    for i, blk in enumerate(enc.blocks):
        h = blk(h)
        if i == 5:
            assert torch.allclose(f5, h[:, 0], atol=1e-5)
    assert torch.allclose(f11, enc.norm(h)[:, 0], atol=1e-5) and not torch.allclose(f11, h[:, 0], atol=1e-3)


def test_head_architecture_and_post_norm_detection(tmp_path):
    head = mr.IDHead(16, hidden=32, out_dim=8, pred_hidden=24)
    kinds = [type(m).__name__ for m in head.projector] + ["|"] + [type(m).__name__ for m in head.predictor]
    assert kinds == ["Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d", "|",
                     "Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d"]
    assert all(m.bias is None for m in head.modules() if isinstance(m, nn.Linear))
    # data2vec 2.0 fairseq layout selects the post-norm ViT; an MAE file does not
    enc = common.create_vit("vit_t16", img_size=32, patch_size=8, post_norm=True)
    ren = {"patch_embed.proj.": "local_encoder.proj.", "cls_token": "extra_tokens", "embed_norm.": "context_encoder.norm."}
    fair = {}
    for k, v in enc.state_dict().items():
        if k == "pos_embed":
            k, v = "fixed_positional_encoder.positions", v[:, 1:]
        for a, b in ren.items():
            k = b + k[len(a):] if k.startswith(a) else k
        fair[k if k.startswith("blocks.") else foreign.DATA2VEC2_PREFIX + k] = v  # fairseq: blocks at the top level
    assert mr.is_post_norm_checkpoint({"model": fair})
    mae = write_mae_release_checkpoint(tmp_path / "mae.pth", patch_size=8)
    assert not mr.is_post_norm_checkpoint(torch.load(tmp_path / "mae.pth"))
    assert mae.post_norm is False


def test_llrd_multipliers_weight_decay_and_freezing():
    args = _resolved("vit_t16", img_size=32, patch_size=8, freeze_blocks=2)
    enc = common.create_vit("vit_t16", img_size=32, patch_size=8)
    m = mr.Refiner(enc, [10, 11], hidden=8, out_dim=4, pred_hidden=8)
    mr.set_trainable(enc, "refine", args.freeze_blocks)
    opt = mr.build_optimizer(m, "refine", args, peak_lr=2.0)
    by = {id(p): g for g in opt.param_groups for p in g["params"]}
    named = dict(m.named_parameters())
    for k in (2, 7, 11):  # block k: 0.65^(depth-k), the last block 0.65 (notes Sec. 4.2)
        assert math.isclose(by[id(named[f"encoder.blocks.{k}.mlp.fc1.weight"])]["lr_scale"], 2.0 * 0.65 ** (12 - k))
    assert math.isclose(by[id(named["encoder.norm.weight"])]["lr_scale"], 2.0)
    frozen = ["encoder.patch_embed.proj.weight", "encoder.cls_token", "encoder.blocks.0.attn.qkv.weight",
              "encoder.blocks.1.norm1.weight", "encoder.pos_embed"]
    assert all(id(named[k]) not in by for k in frozen)
    assert by[id(named["encoder.blocks.5.attn.qkv.weight"])]["weight_decay"] == 0.05
    assert by[id(named["encoder.blocks.5.attn.qkv.bias"])]["weight_decay"] == 0.0
    hw = by[id(named["heads.0.projector.0.weight"])]
    assert hw["weight_decay"] == 1e-5 and hw["lr_scale"] == 2.0 and opt.defaults["betas"] == (0.9, 0.95)
    assert by[id(named["heads.1.predictor.1.weight"])]["weight_decay"] == 0.0  # BN weight
    # unfrozen stem when freeze_blocks = 0: 0.65^(depth+1)
    mr.set_trainable(enc, "refine", 0)
    opt = mr.build_optimizer(m, "refine", args, peak_lr=1.0)
    by = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert math.isclose(by[id(named["encoder.patch_embed.proj.weight"])]["lr_scale"], 0.65 ** 13)
    mr.set_trainable(enc, "heads", 0)
    opt = mr.build_optimizer(m, "heads", args, peak_lr=1.0)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(m.heads.parameters()))
    # schedule: warmup from just above 0, peak 1, cosine to the absolute min lr
    assert math.isclose(mr.lr_factor(0, 100, 10, 1e-3), 1 / 11) and math.isclose(mr.lr_factor(10, 100, 10, 1e-3), 1.0)
    assert math.isclose(mr.lr_factor(100, 100, 10, 1e-3), 1e-3)


def test_local_crop_sizes_and_views():
    assert mr.default_local_size(224, 16) == 96 and mr.default_local_size(224, 14) == 98  # Table 10
    assert mr.default_local_size(32, 4) == 12 and mr.default_local_size(32, 8) == 16
    assert _resolved("vit_h14").local_size == 98 and _resolved("vit_l16").local_size == 96
    args = _resolved("vit_t16", img_size=32, patch_size=4, local_crops=3)
    views = mr.build_views(args)(synthetic.SyntheticShapes(1, img_size=32)[0][0])
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 12, 12)] * 3
    with pytest.raises(common.UserError):
        _resolved("vit_t16", img_size=32, patch_size=4, local_size=10)


def test_missing_files_and_bad_flags_are_one_line_errors(tmp_path):
    p = run_script("mim_refiner.py", "--model", "vit_h14", "--device", "cpu", "--output-dir", tmp_path / "o", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert p.stderr.startswith("error:") and "checkpoints/mae_pretrain_vit_huge.pth" in p.stderr and "data/imagenet" in p.stderr
    write_mae_release_checkpoint(tmp_path / "mae.pth", patch_size=4)
    p = run_script("mim_refiner.py", *TINY, "--data", "synthetic:32:8", "--init", tmp_path / "mae.pth",
                   "--local-size", "10", "--output-dir", tmp_path / "o", check=False)
    assert p.returncode == 2 and p.stderr.startswith("error:") and "--local-size" in p.stderr and "Traceback" not in p.stderr


# ---------------------------------------------------------------------------------------------
def knn_top1(ckpt, tmp_path, data, patch):
    """eval_knn.py on the refined (EMA) encoder; returns top-1 at k=10."""
    out = tmp_path / "knn.json"
    run_script("eval_knn.py", "--checkpoint", ckpt, "--data", data, "--model", "vit_t16", "--img-size", 32,
               "--patch-size", patch, "--k", 10, "--num-workers", 0, "--device", "cpu", "--output-json", out)
    return read_json(out)["top1"]["10"]


FAST = ["--data", "synthetic:32:20", "--batch-size", 16, "--queue-size", 48, "--local-crops", 2, "--head-hidden", 32,
        "--pred-hidden", 32, "--head-blocks", 10, 11, "--warmup-epochs", 1, "--blr", 1e-3, "--head-blr", 1e-3]


@pytest.fixture(scope="module")
def refined(tmp_path_factory):
    """One uninterrupted tiny run from an official-MAE-layout file (with decoder keys): 1 head epoch + 2 refine
    epochs of 2 updates each. Shared by the end-to-end and the resume test."""
    tmp = tmp_path_factory.mktemp("mimref")
    enc0 = write_mae_release_checkpoint(tmp / "mae.pth", patch_size=8, with_decoder=True)
    args = [*TINY, *FAST, "--patch-size", 8, "--init", tmp / "mae.pth", "--head-epochs", 1, "--epochs", 2]
    run_script("mim_refiner.py", *args, "--output-dir", tmp / "a")
    return tmp, args, enc0


def test_end_to_end_from_official_mae_file_then_eval_knn(refined, tmp_path):
    tmp, args, enc0 = refined
    out = tmp / "a"
    ck = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert ck["epoch"] == 3 and ck["stage"] == "refine" and ck["model_is_ema"] is True and ck["head_blocks"] == [10, 11]
    init = enc0.state_dict()
    w = "blocks.11.mlp.fc1.weight"
    d_online = (ck["model_online"][w] - init[w]).abs().max()
    d_ema = (ck["model"][w] - init[w]).abs().max()
    assert d_online > 0 and 0 < d_ema < d_online  # refined online encoder; EMA moved 1e-4 of the way per update
    assert torch.equal(ck["model_online"]["pos_embed"], init["pos_embed"])
    assert ck["queues"]["0.ptr"].item() == (6 * 16) % 48  # 6 updates x 16 images of view g0
    assert 0.0 <= knn_top1(out / "checkpoint-last.pth", tmp_path, "synthetic:32:20", 8) <= 100.0
    log = [l for l in (out / "log.jsonl").read_text().splitlines() if "train/loss" in l]  # the k-NN monitor logs too
    assert len(log) == 6 and "train/nn_acc_block11" in log[-1]
    knn = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines() if "knn/" in l]
    assert len(knn) == 3 and all({"knn/top1_block10", "knn/top1_block11"} <= set(r) for r in knn)  # every epoch (official)
    p = run_script("mim_refiner.py", *args, "--output-dir", out)
    assert "nothing to do" in p.stdout


def test_torchrun_two_processes(tmp_path):
    write_mae_release_checkpoint(tmp_path / "mae.pth", patch_size=8)
    out = tmp_path / "run"
    run_script("mim_refiner.py", *TINY, *FAST, "--patch-size", 8, "--init", tmp_path / "mae.pth", "--head-epochs", 1,
               "--epochs", 1, "--output-dir", out, nproc=2)
    ck = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert ck["epoch"] == 2 and ck["step"] == 4
    assert ck["queues"]["1.ptr"].item() == (4 * 16) % 48  # the global batch (both ranks) is enqueued
    assert 0.0 <= knn_top1(out / "checkpoint-last.pth", tmp_path, "synthetic:32:20", 8) <= 100.0


def test_kill_and_resume_mid_refinement_is_exact(refined):
    tmp, args, _ = refined
    run_script("mim_refiner.py", *args, "--output-dir", tmp / "b", "--exit-after-epochs", 2)  # killed mid-refine
    assert torch.load(tmp / "b" / "checkpoint-last.pth", weights_only=True)["epoch"] == 2
    run_script("mim_refiner.py", *args, "--output-dir", tmp / "b")  # resumes at epoch 2
    a = torch.load(tmp / "a" / "checkpoint-last.pth", weights_only=True)
    b = torch.load(tmp / "b" / "checkpoint-last.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    for key in ("model", "model_online", "heads", "queues"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    assert not torch.equal(a["model"]["blocks.11.attn.qkv.weight"], a["model_online"]["blocks.11.attn.qkv.weight"])
