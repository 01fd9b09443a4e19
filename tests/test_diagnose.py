"""benchmarks/lut_diagnose.py and conmim_diagnose.py: the instrumented run is the script's own run (same final
checkpoint as the script alone), the wrappers are removed afterwards, and the recorded numbers are the ones
the step computed."""
import importlib.util
import json
import sys

import pytest
import torch

from conftest import ONE_THREAD, ROOT, run_script

DATA = ["--model", "vit_t16", "--img-size", "32", "--patch-size", "8", "--num-workers", "0", "--device", "cpu",
        "--data", "synthetic:48:20", "--batch-size", "16", "--epochs", "2", "--warmup-epochs", "1", "--log-every", "1"]
LUT = DATA + ["--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2", "--head-hidden-dim", "32",
              "--pred-hidden-dim", "32", "--momentum", "0.9"]
CONMIM = DATA + ["--head-hidden-dim", "32", "--head-out-dim", "16", "--mask-block", "1", "--lr", "5e-3",
                 "--rel-pos-lr-mult", "20"]


def bench(name):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
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
    mod = bench("lut_diagnose")
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
    mod = bench("conmim_diagnose")
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


def test_official_conmim_encoder_folds_layer_scale_exactly():
    """official_miniature.to_our_layout: a BEiT encoder with layer scale and q/v biases (timm's Beit, the official
    modeling_finetune layout and names) becomes this repository's ViT with the same tokens after the final norm."""
    from timm.models.beit import Beit
    import common
    mod = bench("official_miniature")
    torch.manual_seed(0)
    ref = Beit(img_size=32, patch_size=8, embed_dim=192, depth=3, num_heads=3, num_classes=0, global_pool="token",
               use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True, init_values=0.1).eval()
    with torch.no_grad():  # trained-looking values: per-channel layer scale, non-zero table and biases
        for n, p in ref.named_parameters():
            if n.endswith(("gamma_1", "gamma_2", "q_bias", "v_bias", "relative_position_bias_table")):
                p.normal_()
    sd = {**ref.state_dict(), "mask_token": torch.zeros(1, 1, 192), "projectors.0.weight": torch.zeros(4, 192)}
    ours = common.create_vit("vit_t16", img_size=32, patch_size=8, depth=3, rel_pos_bias=True).eval()
    ours.load_state_dict(mod.to_our_layout(sd), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = ours.forward_features(x), ref.forward_features(x)
    assert (a - b).abs().max() < 1e-5
    with torch.no_grad():  # without the folding the tokens differ: the test sees the layer scale
        plain = {k: v for k, v in sd.items()}
        for n in list(plain):
            if n.endswith(("gamma_1", "gamma_2")):
                plain[n] = torch.ones_like(plain[n])
        ours.load_state_dict(mod.to_our_layout(plain), strict=True)
        assert (ours.forward_features(x) - b).abs().max() > 1e-2


def test_mini_repro_compares_lut_and_conmim_with_their_baselines_and_needs_the_official_checkout(tmp_path):
    mini = bench("mini_repro")

    def res(knn, lin):
        return {"train_seconds": 1.0, "eval": {"top1": {"20": knn}, "linear_probe": 50.0, "linear_grid": lin}}
    per_seed = {s: {"mae": res(50 + s, 40 + s), "lut": res(30 + 2 * s, 20), "lut-official": res(31 + 2 * s, 21),
                    "random-init-rel": res(40, 45 - s), "conmim": res(46 + s, 46)} for s in range(3)}
    rows = {(r["method"], r["baseline"]): r for r in mini.compare(mini.summarize(per_seed, "20"))}
    assert set(rows) == {("lut", "mae"), ("lut-official", "mae"), ("lut-official", "lut"), ("conmim", "random-init-rel")}
    r = rows[("lut", "mae")]["knn"]
    assert r["delta"] == -19 and r["paired"] == [-20, -19, -18] and r["std"] == 2.0 and r["beyond_2std"]
    r = rows[("lut-official", "lut")]["knn"]
    assert r["delta"] == 1 and not r["beyond_2std"]
    r = rows[("conmim", "random-init-rel")]["linear_grid"]
    assert r["delta"] == 2 and r["std"] == 1.0 and not r["beyond_2std"]  # 2 is not more than 2 std
    lines = mini.compare_lines(list(rows.values()), 3, "20")
    assert any(line.startswith("| lut | mae | -19.0 (2.0; -20.0, -19.0, -18.0; yes) |") for line in lines)
    with pytest.raises(SystemExit, match="lut-official need.* --official-lut PATH"):
        mini.main(["--preset", "smoke", "--methods", "lut-official", "--output-dir", str(tmp_path / "r")])
