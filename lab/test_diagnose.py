"""The lab scripts (`make lab-test`). lut_diagnose.py and conmim_diagnose.py: the instrumented run is the script's
own run (same final checkpoint as the script alone), the wrappers are removed afterwards, and the recorded numbers
are the ones the step computed. refiner_diagnose.py counts self-matches and distances; feature_stats.py's spectrum;
lut_gradients.py's gradient norms equal one backward pass per loss."""
import importlib.util
import json

import pytest
import torch

from conftest import ONE_THREAD, ROOT, TINY, run_script, write_mae_release_checkpoint

DATA = ["--model", "vit_t16", "--img-size", "32", "--patch-size", "8", "--num-workers", "0", "--device", "cpu",
        "--data", "synthetic:48:20", "--batch-size", "16", "--epochs", "2", "--warmup-epochs", "1", "--log-every", "1"]
LUT = DATA + ["--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2", "--head-hidden-dim", "32",
              "--pred-hidden-dim", "32", "--momentum", "0.9"]
CONMIM = DATA + ["--head-hidden-dim", "32", "--head-out-dim", "16", "--mask-block", "1", "--lr", "5e-3",
                 "--rel-pos-lr-mult", "20"]


def lab(name):
    """A fresh copy of lab/NAME.py (lab/ is on sys.path: pytest puts a test file's folder there)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "lab" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def same_checkpoint(a, b):
    ca, cb = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))
    for key in ("model", "model_ema", "optimizer"):
        fa, fb = ca[key], cb[key]
        if key == "optimizer":
            fa = {f"{i}.{n}": t for i, s in fa["state"].items() for n, t in s.items()}
            fb = {f"{i}.{n}": t for i, s in fb["state"].items() for n, t in s.items()}
        assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa), key


def log_losses(path):
    return [json.loads(x) for x in path.read_text().splitlines() if "train/loss" in x]


def running_means(values, per_epoch):
    """The epoch's running mean after each step (what the scripts log as train/loss)."""
    return [sum(values[i - i % per_epoch:i + 1]) / (i % per_epoch + 1) for i in range(len(values))]


def test_lut_diagnose_is_the_scripts_run_and_records_its_gradients(tmp_path, capsys, one_thread):
    import lut
    mod = lab("lut_diagnose")
    original = lut.forward_losses
    mod.main(["--output-dir", str(tmp_path / "d"), "--lambda0", "--", *LUT])
    assert lut.forward_losses is original  # the wrapper is gone
    run_script("lut.py", *LUT, "--output-dir", tmp_path / "plain", env=ONE_THREAD)
    same_checkpoint(tmp_path / "d" / "checkpoint-last.pth", tmp_path / "plain" / "checkpoint-last.pth")
    res = json.loads((tmp_path / "d" / "diagnose.json").read_text())
    zero = json.loads((tmp_path / "d" / "lambda0" / "diagnose.json").read_text())
    assert len(res["per_step"]) == 6 and res["static"]["total_steps"] == 6 and res["static"]["warmup_steps"] == 3
    # the recorded losses are the step's: log.jsonl's train/loss (the epoch's running mean) = L_mim + lambda L_bc
    # (lambda 1) averaged over the recorded steps of the epoch so far
    logged = log_losses(tmp_path / "d" / "log.jsonl")
    assert [r["step"] for r in logged] == list(range(1, 7))
    assert running_means([r["loss_mim"] + r["loss_bc"] for r in res["per_step"]], 3) == pytest.approx(
        [r["train/loss"] for r in logged], abs=1e-5)
    assert [r["lr"] for r in res["per_step"]] == pytest.approx([r["train/lr"] for r in logged], abs=1e-15)
    assert all(r["grad_mim"] > 0 and r["grad_bc"] > 0 for r in res["per_step"])
    # lambda 0: the context loss is computed but sends no gradient into the encoder
    assert all(r["grad_bc"] == 0.0 and r["loss_bc"] > 0 for r in zero["per_step"])
    assert zero["static"]["context_weight"] == 0.0 and res["static"]["context_weight"] == 1.0
    # epoch 0 is the seed's initial encoder, the same for both runs; later epochs move away from it
    assert res["per_epoch"]["0"] == zero["per_epoch"]["0"] and res["per_epoch"]["0"]["knn"] >= 0
    assert res["per_epoch"]["2"]["rel_dist"] > res["per_epoch"]["1"]["rel_dist"] > 0
    out = capsys.readouterr().out
    assert "### run: lambda 1" in out and "### lambda 0: lambda 0" in out


def test_conmim_diagnose_sees_the_mask_token_symmetry_and_the_tables_lr(tmp_path, capsys, one_thread):
    import conmim
    mod = lab("conmim_diagnose")
    original, head_forward = conmim.forward_loss, conmim.Projector.forward
    mod.main(["--output-dir", str(tmp_path / "d"), "--", *CONMIM])
    assert conmim.forward_loss is original and conmim.Projector.forward is head_forward
    run_script("conmim.py", *CONMIM, "--output-dir", tmp_path / "plain", env=ONE_THREAD)
    same_checkpoint(tmp_path / "d" / "checkpoint-last.pth", tmp_path / "plain" / "checkpoint-last.pth")
    res = json.loads((tmp_path / "d" / "diagnose.json").read_text())
    steps = res["per_step"]
    logged = log_losses(tmp_path / "d" / "log.jsonl")
    assert len(steps) == len(logged) == 6
    assert running_means([s["loss"] for s in steps], 3) == pytest.approx([r["train/loss"] for r in logged], abs=1e-5)
    # a zero table leaves every masked position with the same prediction; once it moved, they differ
    assert steps[0]["table_absmax"] == 0.0 and steps[0]["masked_q_cos"] == pytest.approx(1.0, abs=1e-5)
    assert steps[-1]["table_absmax"] > 0 and steps[-1]["masked_q_cos"] < 1 - 1e-4
    assert all(s["grad_rms_table"] > 0 and s["grad_rms_rest"] > 0 for s in steps)
    g = res["static"]["groups"]
    table = [v for k, v in g.items() if k.startswith("rel_pos_")]
    rest = [v for k, v in g.items() if not k.startswith("rel_pos_")]
    assert len(table) == 1 and table[0]["peak_lr"] == pytest.approx(5e-3 * 20) and table[0]["params"] == 3 * (7 * 7 + 3)
    assert all(v["peak_lr"] == pytest.approx(5e-3) for v in rest)
    assert res["per_epoch"]["2"]["table_absmax"] == pytest.approx(
        float(torch.load(tmp_path / "d" / "checkpoint-last.pth", weights_only=True)["model"][
            "rel_pos_bias.relative_position_bias_table"].abs().max()))
    assert "| rel_pos_layer0_no_wd |" in capsys.readouterr().out


def test_refiner_diagnose_counts_self_matches_and_distances(tmp_path):
    """lab/refiner_diagnose.py: a queue longer than the data holds every sample's own older entry
    (counted; --exclude-self never returns it), the head stage leaves the encoder and its EMA exactly at the
    start, the refinement moves every block, the lr per block is the optimizer's layer-decayed one."""
    write_mae_release_checkpoint(tmp_path / "mae.pth", patch_size=8)
    flags = [*TINY, "--patch-size", 8, "--data", "synthetic:32:20", "--init", tmp_path / "mae.pth", "--batch-size", 16,
             "--queue-size", 64, "--local-crops", 0, "--head-hidden", 32, "--pred-hidden", 32, "--head-blocks", 10, 11,
             "--head-epochs", 1, "--epochs", 1, "--warmup-epochs", 0, "--topk", 1, "--ema-momentum", 0.9]
    res = {}
    for name, extra in (("plain", ["--no-exclude-self"]), ("excl", ["--exclude-self"])):
        p = run_script("lab/refiner_diagnose.py", "--output-dir", tmp_path / name, "--", *flags, *extra,
                       env=ONE_THREAD)
        assert "| 1 | refine |" in p.stdout
        res[name] = json.loads((tmp_path / name / "diagnose.json").read_text())
    for r in res.values():
        s, pe = r["static"], r["per_epoch"]
        assert s["queue_size"] == 64 and s["dataset_size"] == 32 and s["refine_steps"] == 2
        assert abs(s["ema_init_weight"] - 0.81) < 1e-12
        lr = {int(b): v for b, v in s["lr_per_block"].items()}
        assert all(abs(lr[b] - s["peak_lr"] * 0.65 ** (12 - b)) < 1e-15 for b in range(12))
        assert all(v == 0 for v in pe["0"]["dist_online"].values()) and all(v == 0 for v in pe["0"]["dist_ema"].values())
        assert pe["0"]["knn_ema"] == pe["-1"]["knn_online"]  # the head stage does not touch the encoder
        d1 = {int(b): v for b, v in pe["1"]["dist_online"].items()}
        assert all(d1[b] > 0 for b in range(12))
        # epoch 1: all 32 images were enqueued in epoch 0, the queue holds 64
        assert all(v["own_in_queue"] == 100.0 for v in pe["1"]["lookup"].values())
    assert all(v["self_match"] == 0.0 for v in res["excl"]["per_epoch"]["1"]["lookup"].values())
    assert any(v["self_match"] > 0.0 for v in res["plain"]["per_epoch"]["1"]["lookup"].values())


def test_feature_stats_spectrum_and_cli(tmp_path):
    """lab/feature_stats.py: one dominant direction -> effective rank ~1, top share ~1; isotropic
    features -> effective rank near the dimension; the CLI reads eval_knn.py feature files."""
    feature_stats = lab("feature_stats")
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(16, generator=g)
    one = torch.randn(500, 1, generator=g) * direction + 0.01 * torch.randn(500, 16, generator=g) + 3 * direction
    iso = torch.randn(500, 16, generator=g)
    r1, ri = feature_stats.spectrum(one), feature_stats.spectrum(iso)
    assert r1["top_share"] > 0.95 and r1["eff_rank"] < 1.5
    assert ri["top_share"] < 0.2 and ri["eff_rank"] > 12
    torch.save({"train_features": one}, tmp_path / "one.pth")
    p = run_script("lab/feature_stats.py", tmp_path / "one.pth", env=ONE_THREAD)
    assert "| one.pth |" in p.stdout


# tiny LUT (tests/test_lut.py's settings): 2 epochs of 2 optimizer steps
LUT_GRAD = [*TINY, "--patch-size", "8", "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2",
            "--head-hidden-dim", "64", "--pred-hidden-dim", "64", "--head-out-dim", "32", "--warmup-epochs", "1",
            "--log-every", "1", "--data", "synthetic:32:32", "--batch-size", "16", "--epochs", "2"]


def test_lut_gradients_benchmark_equals_separate_backward_passes(tmp_path, capsys):
    """lab/lut_gradients.py: its losses are the training step's (lut.forward_losses with the same mask
    seed) and its gradient norms equal those of one backward pass per loss over the encoder's parameters."""
    import lut
    lut_gradients = lab("lut_gradients")
    out = tmp_path / "lut"
    run_script("lut.py", *LUT_GRAD, "--output-dir", out)
    ck = torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    args = lut.Args(**ck["args"])
    torch.manual_seed(1)
    weak, strong = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    r = lut_gradients.measure(args, *lut_gradients.build(args, ck), weak, strong, seed=3)
    online, momentum = lut_gradients.build(args, ck)
    online.train()
    momentum.eval()
    torch.manual_seed(3)
    loss_mim, loss_bc = lut.forward_losses(online, momentum, weak, strong, online.encoder.num_patches,
                                           args.mask_ratio, args.symmetric)
    assert abs(r["loss_mim"] - float(loss_mim)) < 1e-6 and abs(r["loss_bc"] - float(loss_bc)) < 1e-6
    norms = []
    for loss in (args.mae_weight * loss_mim, r["context_weight"] * loss_bc):
        online.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        norms.append(sum(float((p.grad.double() ** 2).sum()) for p in online.encoder.parameters()
                         if p.grad is not None) ** 0.5)
    assert norms[0] > 0 and norms[1] > 0
    assert abs(r["grad_mim"] / norms[0] - 1) < 1e-5 and abs(r["grad_bc"] / norms[1] - 1) < 1e-5
    assert abs(r["ratio"] - norms[1] / norms[0]) < 1e-4 * r["ratio"]
    lut_gradients.main(["init", str(out / "checkpoint-last.pth"), "--data", "synthetic:32:32", "--batch", "8"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("init |", str(out)))]
    assert len(rows) == 2
    with pytest.raises(SystemExit, match="needs --args-from"):
        lut_gradients.main(["init"])  # no checkpoint to take the flags from -> one-line message
