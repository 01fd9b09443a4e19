"""Tests for mae_ct.py: NNCLR loss vs explicit loops (symmetric terms, gathered negatives), DDP
equivalence (2 gloo processes with half the batch each == 1 process on the whole batch, in-process via
torch.multiprocessing.spawn), queue FIFO + topk-NN lookup with self-exclusion, the frozen-block split
and optimizer groups, the lr formula and schedule, end to end under torchrun into eval_knn.py, resume."""
import gc
import json
import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

import common
import mae_ct
from conftest import TINY, read_json, run_script, write_mae_release_checkpoint

# tiny end-to-end config: patch 8 (16 tokens) keeps each step cheap on 2 shared cores
E2E = [*TINY, "--patch-size", "8", "--queue-size", "16", "--proj-hidden", "32", "--pred-hidden", "32",
       "--proj-dim", "16", "--batch-size", "8", "--data", "synthetic:16:10", "--topk", "3"]


def tiny_model(seed=0, depth=2, frozen=1, stage=2):
    torch.manual_seed(seed)
    enc = common.create_vit("vit_t16", img_size=16, patch_size=8, dim=32, depth=depth, num_heads=2)
    model = mae_ct.MaeCt(enc, "avg", proj_hidden=24, proj_dim=8, pred_hidden=20)
    mae_ct.set_trainable(model, stage, frozen)
    return model


def hand_nnclr(nn_rows, preds, temperature, offset):
    """Eq. 2 with explicit loops: row i's positive is column offset + i; all columns are negatives."""
    total = 0.0
    for i in range(len(nn_rows)):
        logits = [float(sum(a * b for a, b in zip(nn_rows[i], p))) / temperature for p in preds]
        total += -(logits[offset + i] - math.log(sum(math.exp(l) for l in logits)))
    return total / len(nn_rows)


def hand_argmax_nn(z, queue, ids=None, queue_ids=None):
    out = []
    for i in range(len(z)):
        best, best_j = -float("inf"), None
        for j in range(len(queue)):
            if ids is not None and int(queue_ids[j]) == int(ids[i]):
                continue
            s = float(sum(a * b for a, b in zip(z[i], queue[j])))
            if s > best:
                best, best_j = s, j
        out.append(queue[best_j].tolist())
    return out


def test_loss_matches_hand_computation():
    model = tiny_model()
    model.train()
    queue = mae_ct.NNQueue(12, 8)
    target = mae_ct.copy.deepcopy(model.projector)
    with torch.no_grad():  # make the target projector differ from the online one
        for p in target.parameters():
            p.add_(0.1 * torch.randn_like(p))
    views = [torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16)]
    ids, labels = torch.arange(6), torch.arange(6) % 3
    q_before = queue.queue.clone()
    loss, _ = mae_ct.mae_ct_forward_loss(model, target, queue, views, ids, labels, temperature=0.15, topk=1,
                                         exclude_self=False, device=torch.device("cpu"))
    with torch.no_grad():
        ys, _, pred = model(views)
        z = [F.normalize(target(y), dim=1) for y in ys]
        p = [F.normalize(x, dim=1) for x in pred]
    nn0, nn1 = hand_argmax_nn(z[0], q_before), hand_argmax_nn(z[1], q_before)
    # Algorithm 1: L(nn1, p2)/2 + L(nn2, p1)/2 -> NN of view 0 with predictions of view 1 and vice versa
    want = 0.5 * hand_nnclr(nn0, p[1].tolist(), 0.15, 0) + 0.5 * hand_nnclr(nn1, p[0].tolist(), 0.15, 0)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    # the queue received view 0's normalised target-projector output (FIFO from position 0)
    assert torch.allclose(queue.queue[:6], z[0], atol=1e-6) and torch.equal(queue.queue[6:], q_before[6:])
    assert queue.ids[:6].tolist() == list(range(6)) and int(queue.ptr) == 6
    # gradient reaches only trainable params: the frozen block 0 gets none, block 1 and the heads do
    loss.backward()
    assert model.encoder.blocks[0].attn.qkv.weight.grad is None
    assert model.encoder.blocks[1].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in target.parameters())


def test_queue_fifo_and_nn_lookup():
    q = mae_ct.NNQueue(5, 3)
    assert torch.allclose(q.queue.norm(dim=1), torch.ones(5))  # random unit vectors (official init)
    a = F.normalize(torch.randn(3, 3), dim=1)
    q.enqueue(a, torch.tensor([10, 11, 12]), torch.tensor([0, 1, 2]))
    b = F.normalize(torch.randn(4, 3), dim=1)
    q.enqueue(b, torch.tensor([13, 14, 15, 16]), torch.tensor([3, 4, 0, 1]))
    # FIFO with wrap-around: slots 3,4 get b[0:2], slots 0,1 overwrite the two oldest (a[0], a[1])
    assert torch.equal(q.queue, torch.stack([b[2], b[3], a[2], b[0], b[1]]))
    assert q.ids.tolist() == [15, 16, 12, 13, 14] and int(q.ptr) == 2
    # more entries than slots: only the newest survive
    q.enqueue(torch.eye(3).repeat(3, 1)[:7], torch.arange(7), torch.zeros(7, dtype=torch.long))
    assert q.ids.tolist() == [3, 4, 5, 6, 2] and int(q.ptr) == 4  # as 7 single writes

    # NN lookup on known vectors
    q = mae_ct.NNQueue(4, 2)
    q.queue.copy_(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]]))
    q.ids.copy_(torch.tensor([7, 8, 9, 10]))
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    nn, idx = q.find_nn(z, topk=1)
    assert idx.tolist() == [0, 2] and torch.equal(nn, q.queue[[0, 2]])
    # self-exclusion: sample id 7 may not match its own entry 0 -> next best is entry 1
    nn, idx = q.find_nn(z, topk=1, ids=torch.tensor([7, 9]))
    assert idx.tolist() == [1, 1]
    assert hand_argmax_nn(z, q.queue, torch.tensor([7, 9]), q.ids) == nn.tolist()
    # topk: uniform among the k best (never outside, all reached), self still excluded
    torch.manual_seed(0)
    picks = torch.stack([q.find_nn(z[:1], topk=2, ids=torch.tensor([7]))[1] for _ in range(200)]).flatten()
    assert set(picks.tolist()) == {1, 2}  # sims without entry 0: 0.8, 0.0, -1 -> top-2 = {1, 2}
    picks = torch.stack([q.find_nn(z[:1], topk=2)[1] for _ in range(200)]).flatten()
    assert set(picks.tolist()) == {0, 1}


def test_frozen_split_and_optimizer_groups():
    depth, frozen = 4, 2
    model = tiny_model(depth=depth, frozen=frozen, stage=2)
    enc = model.encoder
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    expect = {n for n, _ in enc.named_parameters()
              if (n.startswith("blocks.") and int(n.split(".")[1]) >= frozen) or n.startswith("norm.")}
    assert trainable == expect
    assert not enc.cls_token.requires_grad and not enc.patch_embed.proj.weight.requires_grad
    args = mae_ct.Args(weight_decay=0.05, head_weight_decay=1e-5, layer_decay=0.65)
    opt = mae_ct.build_optimizer(model, 2, args, enc_lr=1e-3, head_lr=2e-3)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    heads = list(model.projector.parameters()) + list(model.predictor.parameters())
    assert in_opt == {id(p) for p in enc.parameters() if p.requires_grad} | {id(p) for p in heads}
    # lr_scale = peak lr: block k -> 1e-3 * 0.65^(depth-k), final norm 1e-3, heads 2e-3; wd 0 for 1-D
    names = {id(p): n for n, p in enc.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            n = names.get(id(p))
            if n is None:
                assert g["lr_scale"] == 2e-3 and g["weight_decay"] == (0.0 if p.ndim == 1 else 1e-5)
            elif n.startswith("blocks."):
                k = int(n.split(".")[1])
                assert g["lr_scale"] == pytest.approx(1e-3 * 0.65 ** (depth - k))
                assert g["weight_decay"] == (0.0 if p.ndim == 1 else 0.05)
            else:
                assert n.startswith("norm.") and g["lr_scale"] == pytest.approx(1e-3)
    # stage 1: the encoder is completely frozen, only the heads are optimised
    mae_ct.set_trainable(model, 1, frozen)
    assert not any(p.requires_grad for p in enc.parameters())
    opt = mae_ct.build_optimizer(model, 1, args, enc_lr=1e-3, head_lr=5e-4)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in heads}
    # --frozen-blocks 0 unfreezes the stem too (official freezes it only with block 0)
    mae_ct.set_trainable(model, 2, 0)
    assert enc.cls_token.requires_grad and enc.patch_embed.proj.weight.requires_grad and not enc.pos_embed.requires_grad


def test_lr_formula_schedule_and_table_defaults():
    assert mae_ct.scaled_lr(1e-4, 1024) == pytest.approx(1e-4 * 1024 * 2 / 256)  # 8e-4
    a = mae_ct.resolve_args(mae_ct.Args(model="vit_l16"))
    assert (a.epochs, a.batch_size, a.temperature, a.topk, a.projector_ema, a.head_blr, a.pool, a.frozen_blocks) == \
        (20, 1024, 0.2, 20, 0.99, 1e-4, "cls", 12)
    a = mae_ct.resolve_args(mae_ct.Args(model="vit_h14", aug="byol"))
    assert (a.epochs, a.batch_size, a.temperature, a.topk, a.projector_ema, a.head_blr, a.frozen_blocks) == \
        (40, 512, 0.35, 30, 0.995, 5e-4, 16)
    a = mae_ct.resolve_args(mae_ct.Args(model="vit_b16", temperature=0.5))
    assert (a.pool, a.frozen_blocks, a.temperature) == ("avg", 6, 0.5)
    # warmup (s+1)/(W+1) for s < W, then cosine from 1 to ~0 (official schedule, 20% warmup)
    total, w = 100, 20
    f = [mae_ct.lr_factor(s, total, w) for s in range(total)]
    assert f[0] == pytest.approx(1 / 21) and f[19] == pytest.approx(20 / 21) and f[20] == pytest.approx(1.0)
    assert f[60] == pytest.approx(0.5 * (1 + math.cos(math.pi * 40 / 80)))
    assert all(x > y for x, y in zip(f[20:], f[21:])) and 0 < f[-1] < 1e-3


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step(model, target, queue, views, ids, labels):
    loss, _ = mae_ct.mae_ct_forward_loss(model, target, queue, views, ids, labels, temperature=0.2, topk=1,
                                         exclude_self=True, device=torch.device("cpu"))
    loss.backward()
    return loss


def _ddp_worker(rank, world, port, out_dir, views, ids, labels):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    model = common.sync_batchnorm(tiny_model(), torch.device("cpu"))
    target = mae_ct.copy.deepcopy(model.projector)
    torch.manual_seed(1)
    queue = mae_ct.NNQueue(32, 8)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    n = views[0].shape[0] // world
    sl = slice(rank * n, (rank + 1) * n)
    loss = _step(ddp, target, queue, [v[sl] for v in views], ids[sl], labels[sl])
    torch.save({"loss": loss.detach(), "grads": {k: p.grad for k, p in model.named_parameters() if p.grad is not None},
                "buffers": dict(model.named_buffers()), "target_buffers": dict(target.named_buffers()),
                "queue": queue.state_dict()}, os.path.join(out_dir, f"rank{rank}.pt"))
    del ddp  # a DDP wrapper outliving its gloo group aborts the process at exit (~1 run in 10, torch 2.13)
    gc.collect()
    torch.distributed.destroy_process_group()


def test_ddp_equivalence_and_gathered_negatives(tmp_path):
    torch.manual_seed(3)
    views = [torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)]
    ids, labels = torch.arange(8), torch.arange(8) % 4
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path), views, ids, labels), nprocs=2)
    r = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    # single process, whole batch, plain BatchNorm
    model = tiny_model()
    target = mae_ct.copy.deepcopy(model.projector)
    torch.manual_seed(1)
    queue = mae_ct.NNQueue(32, 8)
    q_before = queue.queue.clone()
    loss = _step(model, target, queue, views, ids, labels)
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    target_buffers = {k: b.clone() for k, b in target.named_buffers()}
    # global loss = mean of the rank losses (each a mean over its rows of Eq. 2 vs ALL 8 columns)
    assert (r[0]["loss"] + r[1]["loss"]).item() / 2 == pytest.approx(loss.item(), rel=1e-5)
    # per-rank losses by hand: rows of rank k have their positives at columns 4k..4k+3 (labels offset)
    with torch.no_grad():
        ys, _, pred = model(views)  # BN over the whole batch == synced BN over the two halves
        z = [F.normalize(target(y), dim=1) for y in ys]
        p = [F.normalize(x, dim=1) for x in pred]
    for k in range(2):
        sl = slice(4 * k, 4 * k + 4)
        nn0 = hand_argmax_nn(z[0][sl], q_before)
        nn1 = hand_argmax_nn(z[1][sl], q_before)
        want = 0.5 * hand_nnclr(nn0, p[1].tolist(), 0.2, 4 * k) + 0.5 * hand_nnclr(nn1, p[0].tolist(), 0.2, 4 * k)
        assert r[k]["loss"].item() == pytest.approx(want, rel=1e-5)
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == r[0]["grads"].keys() and len(grads) > 10
    for k, g in grads.items():
        for i in range(2):
            torch.testing.assert_close(r[i]["grads"][k], g, rtol=1e-4, atol=1e-6, msg=k)
    for i in range(2):  # synced BN running statistics and the one global queue are identical too
        for k, b in buffers.items():
            torch.testing.assert_close(r[i]["buffers"][k].float(), b.float(), rtol=1e-5, atol=1e-6, msg=k)
        for k, b in target_buffers.items():
            torch.testing.assert_close(r[i]["target_buffers"][k].float(), b.float(), rtol=1e-5, atol=1e-6, msg=k)
        for k, b in queue.state_dict().items():
            torch.testing.assert_close(r[i]["queue"][k], b, rtol=1e-5, atol=1e-6, msg=k)


def test_end_to_end_torchrun_to_eval_knn(tmp_path):
    init = tmp_path / "mae.pth"
    write_mae_release_checkpoint(init, patch_size=8)
    out = tmp_path / "run"
    run_script("mae_ct.py", *E2E, "--init", init, "--output-dir", out, "--head-epochs", "1", "--epochs", "1",
               "--exclude-self", nproc=2)
    ck = torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert ck["model_is_ema"] and ck["stage"] == 2 and ck["epoch"] == 2 and ck["pool"] == "avg"
    assert {"model", "model_online", "projector", "predictor", "target_projector", "queue", "optimizer"} <= ck.keys()
    init_sd = torch.load(init, weights_only=True)["model"]
    online, ema = ck["model_online"], ck["model"]
    # frozen lower half (blocks 0-5 of 12) + stem unchanged; tuned upper blocks changed; EMA lags
    for k in ("blocks.0.attn.qkv.weight", "blocks.5.mlp.fc2.weight", "cls_token", "patch_embed.proj.weight"):
        assert torch.equal(online[k], init_sd[k]) and torch.equal(ema[k], init_sd[k])
    d_online = (online["blocks.11.attn.qkv.weight"] - init_sd["blocks.11.attn.qkv.weight"]).abs().max()
    d_ema = (ema["blocks.11.attn.qkv.weight"] - init_sd["blocks.11.attn.qkv.weight"]).abs().max()
    assert d_online > 0 and 0 < d_ema < d_online
    # the lr actually used: first stage-2 update = lr * 1/(W+1), lr = 1e-4 * 8 * 2 / 256, W = floor(0.2 * 1 step)
    logs = [json.loads(line) for line in open(out / "log.jsonl") if "train/stage" in line]  # not the k-NN lines
    s2 = [l for l in logs if l["train/stage"] == 2]
    assert s2[0]["train/lr"] == pytest.approx(1e-4 * 8 * 2 / 256)
    p = run_script("eval_knn.py", "--checkpoint", out / "checkpoint-last.pth", *TINY, "--patch-size", "8",
                   "--data", "synthetic:16:10", "--pool", "avg", "--k", "3", "--output-json", tmp_path / "knn.json")
    res = read_json(tmp_path / "knn.json")
    assert 0 <= res["top1"]["3"] <= 100 and "EMA" in p.stdout + p.stderr + str(res["protocol"])


def test_resume_gives_identical_weights(tmp_path):
    init = tmp_path / "mae.pth"
    write_mae_release_checkpoint(init, patch_size=8)
    common_args = [*E2E, "--init", init, "--head-epochs", "1", "--epochs", "2"]
    run_script("mae_ct.py", *common_args, "--output-dir", tmp_path / "a")
    # killed at the stage boundary, then inside stage 2, then finished
    run_script("mae_ct.py", *common_args, "--output-dir", tmp_path / "b", "--exit-after-epochs", "1")
    assert torch.load(tmp_path / "b" / "checkpoint-last.pth", weights_only=True)["stage"] == 1
    run_script("mae_ct.py", *common_args, "--output-dir", tmp_path / "b", "--exit-after-epochs", "2")
    run_script("mae_ct.py", *common_args, "--output-dir", tmp_path / "b")
    a = torch.load(tmp_path / "a" / "checkpoint-last.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint-last.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    for key in ("model", "model_online", "projector", "predictor", "target_projector", "queue"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    assert not torch.equal(a["model"]["blocks.11.attn.qkv.weight"], a["model_online"]["blocks.11.attn.qkv.weight"])
    p = run_script("mae_ct.py", *common_args, "--output-dir", tmp_path / "a")
    assert "nothing to do" in p.stdout


def test_bad_flags_give_one_line_errors(tmp_path):
    p = run_script("mae_ct.py", *E2E, "--output-dir", tmp_path / "x", "--init", tmp_path / "none.pth",
                   "--accum-steps", "2", check=False)
    assert p.returncode == 2 and p.stderr.startswith("error:") and "--accum-steps" in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert run_script("mae_ct.py", "--help").stdout.count("--") > 40  # every field's docstring renders
    # the other checks in-process (same UserError -> one line via common.run_main)
    for kw, needle in [(dict(aug="randaug"), "--aug"), (dict(pool="max"), "--pool"), (dict(topk=40), "--topk"),
                       (dict(frozen_blocks=13), "--frozen-blocks"), (dict(batch_size=1), "--batch-size")]:
        with pytest.raises(common.UserError, match=needle):
            mae_ct.resolve_args(mae_ct.Args(model="vit_t16", queue_size=16, **kw))
    with pytest.raises(common.UserError, match="--init"):
        mae_ct.main(mae_ct.Args(model="vit_t16", data="synthetic:16:4", batch_size=8, output_dir=str(tmp_path / "y"),
                                device="cpu"))
