"""benchmarks/mini_repro.py: the table machinery end to end on a few-step configuration."""
import json
import re

import torch

import common
from conftest import ONE_THREAD, run_script


def test_mini_repro_smoke_table_plot_and_numbers(tmp_path):
    out = tmp_path / "results"
    # --seed 1 (not the default 0): every run and both random-init baselines must take it
    p = run_script("benchmarks/mini_repro.py", "--preset", "smoke", "--seed", "1", "--output-dir", out, timeout=900,
                   env=ONE_THREAD)
    # the child's end-of-epoch line is streamed while it trains, with the elapsed seconds
    assert re.search(r"\[mae\] epoch 0 done, mean loss [\d.]+, \d+ s \(\d+ s\)", p.stdout)
    res = json.loads((out / "results.json").read_text())
    assert list(res["results"]) == ["raw-pixels", "random-init", "random-init-rel", "mae"]
    # ConMIM's baseline is the relative-position-bias ViT at ConMIM's own initialisation (same seed)
    rel = torch.load(out / "runs" / "random-init-rel" / "checkpoint-last.pth")["model"]
    common.seed_everything(1)
    ref = common.create_vit("vit_t16", img_size=32, patch_size=4, rel_pos_bias=True).state_dict()
    assert "pos_embed" not in rel and rel.keys() == ref.keys()
    assert all(torch.equal(rel[k], ref[k]) for k in ref)
    assert res["seed"] == 1 and "--seed 1" in res["results"]["mae"]["train_cmd"]
    assert res["results"]["random-init"]["eval_cmd"].endswith("--seed 1")
    table = (out / "table.md").read_text()
    assert "seed 1;" in table
    for m, r in res["results"].items():
        # the table row holds exactly the kNN number that eval_knn.py wrote for that method
        ev = json.loads((out / "evals" / f"{m}.json").read_text())
        assert r["eval"]["top1"]["20"] == ev["top1"]["20"]
        row = next(line for line in table.splitlines() if line.startswith(f"| {m} |"))
        assert f"| {ev['top1']['20']:.1f} |" in row
        assert 0.0 <= r["eval"]["linear_probe"] <= 100.0
        if m == "raw-pixels":
            assert r["eval"]["linear_grid"] is None and "| - |" in row
        else:  # the linear-probe column is eval_linear.py's best head (DINOv2 grid), from its own JSON
            lin = json.loads((out / "evals" / f"{m}_linear.json").read_text())
            assert lin["protocol"]["epochs"] == 1 and r["eval"]["linear_grid"] == lin["best"]["top1"]
            assert f"| {lin['best']['top1']:.1f} |" in row
    # the MAE run is evaluated on every block (12 for vit_t16), the best block is reported
    assert len(res["results"]["mae"]["eval"]["per_block"]) == 12
    assert re.search(r"\| mae \| [\d.]+ \| [\d.]+ \(block \d+\) \|", table)
    assert (out / "per_block_knn.png").stat().st_size > 1000
    assert (out / "runs" / "mae" / "checkpoint-last.pth").exists()
    readme = (out / "README.md").read_text()  # written from the same run: command, machine, the table
    assert "--preset smoke --seed 1" in readme and "cores, torch" in readme
    assert f"| mae | {res['results']['mae']['eval']['top1']['20']:.1f} |" in readme


def test_mini_repro_seeds_aggregate(tmp_path):
    """--seeds: one folder per seed, the table and README give mean +- sample std of the per-seed evals."""
    out = tmp_path / "results"
    run_script("benchmarks/mini_repro.py", "--preset", "smoke", "--seeds", "0", "3", "--methods", "random-init",
               "--output-dir", out, timeout=600, env=ONE_THREAD)
    res = json.loads((out / "results.json").read_text())
    v = [json.loads((out / f"seed{s}" / "evals" / "random-init.json").read_text())["top1"]["20"] for s in (0, 3)]
    assert v[0] != v[1]  # the seed reaches the random initialisation
    assert res["seeds"] == [0, 3] and res["summary"]["random-init"]["knn"]["values"] == v
    mean, std = (v[0] + v[1]) / 2, abs(v[0] - v[1]) / 2 ** 0.5
    assert abs(res["summary"]["random-init"]["knn"]["std"] - std) < 1e-9
    assert f"| random-init | {mean:.1f} +- {std:.1f} |" in (out / "table.md").read_text()
    readme = (out / "README.md").read_text()
    assert "--seeds 0 3" in readme and f"{mean:.1f} +- {std:.1f}" in readme


def test_mini_repro_lift_against_mae():
    """lifts(): difference of the seed means at the last block and the head blocks, against twice the
    larger seed std; summarize() takes sample stds."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import mini_repro

    def res(b0, b1, head_blocks=None):
        r = {"train_seconds": 1.0, "eval": {"top1": {"20": b1}, "linear_probe": 50.0,
                                            "per_block": {"0": {"top1": {"20": b0}}, "1": {"top1": {"20": b1}}}}}
        return {**r, "head_blocks": head_blocks} if head_blocks else r
    per_seed = {0: {"mae": res(50, 50), "mim_refiner": res(51, 56, [1])},
                1: {"mae": res(52, 51), "mim_refiner": res(50, 58, [1])},
                2: {"mae": res(51, 52), "mim_refiner": res(52, 57, [1])}}
    summary = mini_repro.summarize(per_seed, "20")
    assert summary["mae"]["knn"]["mean"] == 51 and abs(summary["mae"]["knn"]["std"] - 1.0) < 1e-12
    lift = mini_repro.lifts(summary)["mim_refiner"]
    assert list(lift) == [1]  # the head block, which is also the last block
    assert lift[1]["delta"] == 6 and lift[1]["paired"] == [6, 7, 5] and lift[1]["above_2std"]
    per_seed[1]["mim_refiner"]["eval"]["per_block"]["1"]["top1"]["20"] = 50  # a seed without the lift
    lift = mini_repro.lifts(mini_repro.summarize(per_seed, "20"))["mim_refiner"]
    assert not lift[1]["above_2std"]


def test_feature_stats_spectrum_and_cli(tmp_path):
    """benchmarks/feature_stats.py: one dominant direction -> effective rank ~1, top share ~1; isotropic
    features -> effective rank near the dimension; the CLI reads eval_knn.py feature files."""
    import sys
    from pathlib import Path

    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import feature_stats
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(16, generator=g)
    one = torch.randn(500, 1, generator=g) * direction + 0.01 * torch.randn(500, 16, generator=g) + 3 * direction
    iso = torch.randn(500, 16, generator=g)
    r1, ri = feature_stats.spectrum(one), feature_stats.spectrum(iso)
    assert r1["top_share"] > 0.95 and r1["eff_rank"] < 1.5
    assert ri["top_share"] < 0.2 and ri["eff_rank"] > 12
    torch.save({"train_features": one}, tmp_path / "one.pth")
    p = run_script("benchmarks/feature_stats.py", tmp_path / "one.pth", env=ONE_THREAD)
    assert "| one.pth |" in p.stdout


def test_refiner_diagnose_counts_self_matches_and_distances(tmp_path):
    """benchmarks/refiner_diagnose.py: a queue longer than the data holds every sample's own older entry
    (counted; --exclude-self never returns it), the head stage leaves the encoder and its EMA exactly at the
    start, the refinement moves every block, the lr per block is the optimizer's layer-decayed one."""
    from conftest import TINY, write_mae_release_checkpoint
    write_mae_release_checkpoint(tmp_path / "mae.pth", patch_size=8)
    flags = [*TINY, "--patch-size", 8, "--data", "synthetic:32:20", "--init", tmp_path / "mae.pth", "--batch-size", 16,
             "--queue-size", 64, "--local-crops", 0, "--head-hidden", 32, "--pred-hidden", 32, "--head-blocks", 10, 11,
             "--head-epochs", 1, "--epochs", 1, "--warmup-epochs", 0, "--topk", 1, "--ema-momentum", 0.9]
    res = {}
    for name, extra in (("plain", ["--no-exclude-self"]), ("excl", ["--exclude-self"])):
        p = run_script("benchmarks/refiner_diagnose.py", "--output-dir", tmp_path / name, "--", *flags, *extra,
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
