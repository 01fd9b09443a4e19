"""Speed and scale (issue #8): --compile checkpoint interchange, --fsdp (FSDP2 under torchrun x2 with gloo),
gradient checkpointing in the method modules, the training benchmark and the memory estimate.

Why the --compile tests use torch.compile(backend="eager"): a cold inductor compile of even the tiny MAE
takes about 70 s on 2 CPU cores (C++ code generation), over this file's budget. The eager backend still
traces with dynamo and wraps modules exactly like the default (`OptimizedModule`, `_orig_mod.` keys), so
the checkpoint/prefix handling under test is the same; only the generated kernels differ.
"""
import functools
import json
import sys

import pytest
import torch

import common
import fsdp
from conftest import ONE_THREAD, TINY, read_json, run_inprocess, run_script, write_mae_release_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_vit_state_dict(sd, name="vit_t16", img=32, patch=8):
    """A plain timm-named encoder state dict: exactly our ViT's keys and shapes, full tensors, no wrapper prefixes."""
    ref = common.create_vit(name, img_size=img, patch_size=patch).state_dict()
    assert set(sd) == set(ref), set(sd) ^ set(ref)
    for k, v in sd.items():
        assert type(v) is torch.Tensor and v.shape == ref[k].shape, (k, type(v), v.shape)
        assert not any(p in k for p in ("module.", "_orig_mod.", "_fsdp", "_checkpoint")), k


# ---------------------------------------------------------------------------------------------
# --compile: checkpoints without `_orig_mod.`, loadable either way
# ---------------------------------------------------------------------------------------------
def test_compiled_module_state_dict_prefix_round_trip():
    torch.manual_seed(0)
    plain = common.create_vit("vit_t16", img_size=32, patch_size=8)
    compiled = torch.compile(plain, backend="eager")
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())  # what a naive save would write
    sd = common.encoder_state_dict(compiled)
    assert_vit_state_dict(sd)
    assert common.full_state_dict(compiled).keys() == sd.keys()
    # a file written from the compiled module's raw state dict loads into a plain model, and ours into a compiled one
    other = common.create_vit("vit_t16", img_size=32, patch_size=8)
    common.load_encoder(other, {"model": compiled.state_dict()})
    torch.manual_seed(1)
    target = torch.compile(common.create_vit("vit_t16", img_size=32, patch_size=8), backend="eager")
    common.load_encoder(common.unwrap(target), {"model": sd})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(other(x), plain(x)) and torch.equal(target(x), plain(x))


def test_compile_on_and_off_resume_each_others_checkpoints(tmp_path, capsys, monkeypatch):
    """mae.py: 1 epoch with --compile, resume without it, and the other way round; both equal the
    uninterrupted plain run (the eager backend computes what eager mode computes)."""
    import mae
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    args = [*TINY, "--patch-size", 8, "--decoder-dim", 32, "--decoder-depth", 1, "--decoder-heads", 2, "--batch-size", 8,
            "--warmup-epochs", 1, "--blr", 1e-3, "--vis-images", 0, "--data", "synthetic:16:8", "--epochs", 2]
    assert run_inprocess(capsys, mae, *args, "--output-dir", tmp_path / "plain")[0] == 0
    for first, second, out in ((["--compile"], [], "c_then_p"), ([], ["--compile"], "p_then_c")):
        assert run_inprocess(capsys, mae, *args, *first, "--exit-after-epochs", 1, "--output-dir", tmp_path / out)[0] == 0
        mid = load(tmp_path / out / "checkpoint-last.pth")
        assert mid["epoch"] == 1 and mid["args"]["compile"] == bool(first)
        assert_vit_state_dict(mid["model"])
        code, stdout, _ = run_inprocess(capsys, mae, *args, *second, "--output-dir", tmp_path / out)
        assert code == 0 and "resuming" in stdout
    ref = load(tmp_path / "plain" / "checkpoint-last.pth")
    for out in ("c_then_p", "p_then_c"):
        ck = load(tmp_path / out / "checkpoint-last.pth")
        assert ck["epoch"] == 2
        for key in ("model", "decoder"):
            for k in ref[key]:
                assert torch.equal(ck[key][k], ref[key][k]), (out, key, k)


# ---------------------------------------------------------------------------------------------
# --fsdp under torchrun x2 (gloo)
# ---------------------------------------------------------------------------------------------
REFINER = [*TINY, "--patch-size", 8, "--data", "synthetic:32:20", "--batch-size", 16, "--queue-size", 48,
           "--local-crops", 2, "--head-hidden", 32, "--pred-hidden", 32, "--head-blocks", 10, 11, "--warmup-epochs", 1,
           "--blr", 1e-3, "--head-blr", 1e-3, "--head-epochs", 1, "--epochs", 2]


def test_fsdp_mim_refiner_resume_and_eval_knn(tmp_path):
    """Sharded encoder + EMA + heads: killed after the first refinement epoch and resumed (sharded optimizer state
    reloaded); the gathered checkpoint is the plain format: "model" (EMA) timm-named, eval_knn.py reads it."""
    enc0 = write_mae_release_checkpoint(tmp_path / "mae.pth", patch_size=8)
    out = tmp_path / "fsdp"
    args = [*REFINER, "--init", tmp_path / "mae.pth", "--fsdp", "--output-dir", out]
    run_script("mim_refiner.py", *args, "--exit-after-epochs", 2, nproc=2)
    mid = load(out / "checkpoint-last.pth")
    assert mid["epoch"] == 2 and mid["stage"] == "refine"
    assert all(isinstance(k, str) and k.startswith(("encoder.", "heads.")) for k in mid["optimizer"]["state"])
    p = run_script("mim_refiner.py", *args, nproc=2)
    assert "resuming" in p.stdout
    ck = load(out / "checkpoint-last.pth")
    assert ck["epoch"] == 3 and ck["step"] == 6 and ck["model_is_ema"] is True
    for key in ("model", "model_online"):
        assert_vit_state_dict(ck[key])
    assert set(ck["heads"]) == set(mid["heads"]) and all(type(v) is torch.Tensor for v in ck["heads"].values())
    w = "blocks.11.mlp.fc1.weight"
    moved_online = (ck["model_online"][w] - enc0.state_dict()[w]).abs().max()
    moved_ema = (ck["model"][w] - enc0.state_dict()[w]).abs().max()
    assert moved_online > 0 and 0 < moved_ema < moved_online  # refined, EMA updated on the shards
    lines = [json.loads(line) for line in open(out / "log.jsonl")]
    losses = [r["train/loss"] for r in lines if "train/loss" in r]
    assert len(losses) == 6 and all(0 < v < 20 for v in losses)
    assert sum("knn/top1_block11" in r for r in lines) == 3  # the k-NN monitor ran on the sharded EMA every epoch
    knn = tmp_path / "knn.json"
    run_script("eval_knn.py", "--checkpoint", out / "checkpoint-last.pth", "--data", "synthetic:32:20", "--img-size", 32,
               "--patch-size", 8, "--k", 10, "--num-workers", 0, "--device", "cpu", "--output-json", knn)
    assert 0.0 <= read_json(knn)["top1"]["10"] <= 100.0
    # the monitor's last number (sharded extraction) = eval_knn.py on its bank (default 10% of train, seed 0)
    run_script("eval_knn.py", "--checkpoint", out / "checkpoint-last.pth", "--data", "synthetic:32:20", "--k", 20,
               "--train-subset", 0.1, "--blocks", 10, 11, "--num-workers", 0, "--device", "cpu", "--output-json", knn)
    ref = read_json(knn)["per_block"]
    assert {b: lines[-1][f"knn/top1_block{b}"] for b in (10, 11)} == {b: ref[str(b)]["top1"]["20"] for b in (10, 11)}


MAE = [*TINY, "--patch-size", 8, "--decoder-dim", 32, "--decoder-depth", 1, "--decoder-heads", 2, "--batch-size", 8,
       "--warmup-epochs", 1, "--blr", 1e-3, "--vis-images", 2, "--data", "synthetic:32:8", "--epochs", 1,
       "--accum-steps", 2]


def test_fsdp_mae_equals_ddp_with_accumulation(tmp_path):
    """mae.py --fsdp (gradient accumulation without reduce-scatter on the first micro-step) gives the DDP run's
    losses and weights: same maths, only the communication differs."""
    for name, extra in (("fsdp", ["--fsdp"]), ("ddp", [])):
        run_script("mae.py", *MAE, *extra, "--output-dir", tmp_path / name, nproc=2, env=ONE_THREAD)
    f, d = load(tmp_path / "fsdp" / "checkpoint-last.pth"), load(tmp_path / "ddp" / "checkpoint-last.pth")
    assert_vit_state_dict(f["model"])
    assert f["decoder"].keys() == d["decoder"].keys()
    for key in ("model", "decoder"):
        for k in d[key]:
            assert torch.allclose(f[key][k], d[key][k], atol=1e-6), (key, k)
    assert not torch.equal(f["model"]["blocks.0.attn.qkv.weight"],
                           common.create_vit("vit_t16", img_size=32, patch_size=8).state_dict()["blocks.0.attn.qkv.weight"])
    logs = {n: [json.loads(l)["train/loss"] for l in open(tmp_path / n / "log.jsonl") if "train/loss" in l] for n in ("fsdp", "ddp")}
    assert len(logs["fsdp"]) == 4 and logs["fsdp"] == pytest.approx(logs["ddp"], abs=1e-6)
    assert (tmp_path / "fsdp" / "recon_epoch000.png").is_file()  # the figure's forward runs on every rank under FSDP
    enc = common.create_vit("vit_t16", img_size=32, patch_size=8)
    common.load_encoder(enc, str(tmp_path / "fsdp" / "checkpoint-last.pth"))


def test_fsdp_refusals_are_one_line_errors(capsys):
    import conmim
    import lut
    import mae
    import mae_ct
    import mim_refiner
    for module in (mae_ct, lut, conmim):
        code, _, err = run_inprocess(capsys, module, *TINY, "--fsdp", "--data", "synthetic:16:8")
        errors = [x for x in err.splitlines() if "error:" in x]  # not a flag of these scripts (argparse's usage + one line)
        assert code == 2 and len(errors) == 1 and "--fsdp" in errors[0] and "Traceback" not in err, err
    code, _, err = run_inprocess(capsys, mae, *TINY, "--fsdp", "--compile", "--data", "synthetic:16:8")
    assert code == 2 and err.strip() == "error: --fsdp with --compile is not supported; drop one of them"
    with pytest.raises(common.UserError, match="--fsdp with --compile"):
        mim_refiner.resolve_args(mim_refiner.Args(model="vit_t16", img_size=32, patch_size=4, fsdp=True, compile=True), False)


def test_optimizer_state_converts_between_the_ddp_and_fsdp_formats():
    """The numbered (DDP / single process) and the named (FSDP) optimizer formats load into the other kind of module
    (the memory plan may choose either parallelism on a resume): the state round-trips exactly."""
    m = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW([{"params": [m[1].weight]}, {"params": [m[0].weight, m[0].bias, m[1].bias], "lr": 0.1}])
    m(torch.randn(4, 2)).sum().backward()
    opt.step()
    plain = opt.state_dict()
    names = fsdp._optimizer_names(m, opt)
    assert names == ["1.weight", "0.weight", "0.bias", "1.bias"]
    named = {"state": {names[i]: v for i, v in plain["state"].items()},
             "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in plain["param_groups"]]}
    opt2 = torch.optim.AdamW([{"params": [m[1].weight]}, {"params": [m[0].weight, m[0].bias, m[1].bias], "lr": 0.1}])
    common.load_optimizer_state_dict(m, opt2, named)
    back = opt2.state_dict()
    assert back["param_groups"] == plain["param_groups"]
    for i, st in plain["state"].items():
        assert all(torch.equal(st[k], back["state"][i][k]) for k in st)
    common.load_optimizer_state_dict(m, opt2, plain)  # the plain format loads as before


# ---------------------------------------------------------------------------------------------
# activation checkpointing in the method modules (the encoder alone: test_common.py)
# ---------------------------------------------------------------------------------------------
def test_grad_checkpointing_same_gradients_mae_with_drop_path():
    """tests/test_common.py covers forward_features without stochastic depth; here the MAE path: visible-token
    subset (keep_idx), checkpointed decoder, and drop-path in train mode (checkpoint replays the RNG)."""
    import mae
    grads = []
    for gc in (0, 2):  # none, all
        torch.manual_seed(0)
        enc = common.create_vit("vit_t16", img_size=32, patch_size=8, depth=2, drop_path_rate=0.2, grad_checkpointing=gc)
        dec = mae.MaeDecoder(enc.dim, enc.grid, 8, dim=32, depth=2, num_heads=2, grad_checkpointing=gc)
        model = mae.MaskedAutoencoder(enc, dec, 0.75, True).train()
        torch.manual_seed(1)
        x, noise = torch.randn(4, 3, 32, 32), torch.rand(4, 16)
        loss, _, _ = model(x, noise=noise)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_grad_checkpointing_same_gradients_refiner_intermediate_blocks():
    import mim_refiner as mr
    grads = []
    for gc in (0, 3):  # none, all
        torch.manual_seed(0)
        enc = common.create_vit("vit_t16", img_size=32, patch_size=8, depth=3, grad_checkpointing=gc)
        model = mr.Refiner(enc, [1, 2], 16, 8, 16).train()
        xg, xl = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 16, 16)
        sum(p.square().sum() + z.sum() for z, p in model(xg, xl)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-5), n


def test_grad_checkpointing_k_blocks_same_gradients_and_only_trainable_blocks(monkeypatch):
    """grad_checkpointing = k checkpoints the first k blocks that have trainable parameters (the memory plan's
    choice): same gradients as none or all, k calls of torch.utils.checkpoint, frozen leading blocks skipped."""
    grads, calls = [], []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for gc in (0, 2, 4):  # 4 >= depth: every trainable block
        torch.manual_seed(0)
        enc = common.create_vit("vit_t16", img_size=32, patch_size=8, depth=4, grad_checkpointing=gc)
        for p in enc.blocks[0].parameters():
            p.requires_grad_(False)
        calls.clear()
        enc.forward_features(torch.randn(2, 3, 32, 32)).square().sum().backward()
        assert len(calls) == {0: 0, 2: 2, 4: 3}[gc]
        assert enc.checkpointed_blocks() == {0: [], 2: [1, 2], 4: [1, 2, 3]}[gc]
        grads.append({n: p.grad for n, p in enc.named_parameters() if p.grad is not None})
    for g in grads[1:]:
        assert g.keys() == grads[0].keys()
        for n in g:
            assert torch.allclose(g[n], grads[0][n], atol=1e-6), n


# ---------------------------------------------------------------------------------------------
# benchmarks: smoke runs (no timing assertions)
# ---------------------------------------------------------------------------------------------
def test_bench_train_prints_a_table(capsys):
    sys.path.insert(0, str(common.Path(common.__file__).parent / "benchmarks"))
    import bench_train
    assert bench_train.main(["--methods", "mae", "mim_refiner", "--batch-size", "4", "--rounds", "1", "--iters", "1",
                             "--data-images", "4", "--data-batches", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    header = [l for l in out if l.startswith("| method |")]
    rows = [l.split("|")[1:-1] for l in out if l.startswith("| mae ") or l.startswith("| mim_refiner ")]
    assert len(header) == 1 and "ratio" in header[0] and "data img/s/core" in header[0]
    assert len(rows) == 2
    for r in rows:
        assert float(r[2]) > 0 and float(r[3]) > 0 and float(r[4]) > 0 and float(r[5]) > 0


def test_bench_finetune_prints_a_table(capsys):
    sys.path.insert(0, str(common.Path(common.__file__).parent / "benchmarks"))
    import bench_finetune
    assert bench_finetune.main(["--models", "vit_t16", "--img-size", "32", "--patch-size", "8", "--batch-size", "4",
                                "--rounds", "1", "--iters", "1", "--device", "cpu"]) == 0
    rows = [l.split("|")[1:-1] for l in capsys.readouterr().out.splitlines() if l.startswith("| vit_t16 ")]
    assert len(rows) == 1 and float(rows[0][4]) > 0 and float(rows[0][5]) > 0 and float(rows[0][6]) > 0
