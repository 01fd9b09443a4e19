"""miniature/mini_repro.py: the table machinery end to end on a few-step configuration (fine-tuning and CPU seconds
included), the seed aggregation, the comparisons and the fine-tuning verdicts, the per-process CPU seconds under
parallel seeds; miniature/official_miniature.py's conversion of the official ConMIM encoder."""
import importlib.util
import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import common
from conftest import ONE_THREAD, ROOT, run_script


def miniature(name):
    """miniature/NAME.py as a module (a fresh copy)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "miniature" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_mini_repro_smoke_table_plot_and_numbers(tmp_path):
    out = tmp_path / "results"
    # --seed 1 (not the default 0): every run and both random-init baselines must take it
    p = run_script("miniature/mini_repro.py", "--preset", "smoke", "--seed", "1", "--output-dir", out, timeout=900,
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
    # fine-tuning: finetune.py run on each checkpoint (scratch: --init none), the column its last epoch's top-1
    for m in ("random-init", "random-init-rel", "mae"):
        ft = res["results"][m]["finetune"][""]
        out_json = json.loads((out / "evals" / f"{m}_finetune.json").read_text())
        assert ft["top1_last"] == out_json["top1_last"] and ft["top1_best"] == out_json["top1_best"]
        assert out_json["protocol"]["seed"] == 1 and out_json["protocol"]["epochs"] == 1
        assert "--init none" in ft["cmd"] if m == "random-init" else f"--init {out / 'runs' / m}" in ft["cmd"]
        row = next(line for line in table.splitlines() if line.startswith(f"| {m} |"))
        assert f"| {ft['top1_last']:.1f} |" in row
        assert 0 < ft["cpu_seconds"] < 1.5 * ft["seconds"] + 1  # one thread: the child's own CPU seconds
    assert "finetune" not in res["results"]["raw-pixels"] and "| mae fine-tuned | scratch fine-tuned |" in readme
    # CPU seconds of the training beside the wall seconds, stored with the checkpoint for reruns
    mae = res["results"]["mae"]
    assert 0 < mae["train_cpu_seconds"] < 1.5 * mae["train_seconds"] + 1
    wall, cpu = map(float, (out / "runs" / "mae" / "mini_repro_train_seconds.txt").read_text().split())
    assert (wall, cpu) == (round(mae["train_seconds"], 1), round(mae["train_cpu_seconds"], 1))
    assert re.search(rf"\| mae \|.* \| {mae['train_cpu_seconds']:.0f} s \| {mae['train_seconds']:.0f} s \|", table)


def test_mini_repro_seeds_aggregate(tmp_path):
    """--seeds: one folder per seed, the table and README give mean +- sample std of the per-seed evals."""
    out = tmp_path / "results"
    run_script("miniature/mini_repro.py", "--preset", "smoke", "--seeds", "0", "3", "--methods", "random-init",
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
    ft = [json.loads((out / f"seed{s}" / "evals" / "random-init_finetune.json").read_text())["top1_last"]
          for s in (0, 3)]
    assert res["summary"]["random-init"]["finetune"][""]["top1"]["values"] == ft


def test_mini_repro_cpu_seconds_are_each_childs_own_under_parallel_seeds(tmp_path):
    """run() measures each child's CPU time with os.wait4 on its pid: a child that sleeps while another seed's child
    computes and ends first counts none of that computation (a getrusage(RUSAGE_CHILDREN) delta would)."""
    mini = miniature("mini_repro")
    burn = [sys.executable, "-c", "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.8: pass"]
    sleep = [sys.executable, "-c", "import time; time.sleep(2.0)"]
    with ThreadPoolExecutor(2) as pool:
        slept = pool.submit(mini.run, sleep, tmp_path / "sleep.log")
        burnt = pool.submit(mini.run, burn, tmp_path / "burn.log")
        (wall_s, cpu_s), (_, cpu_b) = slept.result(), burnt.result()
    assert wall_s >= 2.0 and cpu_s < 0.5  # python's start-up only
    assert cpu_b >= 0.8


def test_mini_repro_finetune_comparisons_and_verdicts():
    """ft_compare() and the README's fine-tuning section: MAE against scratch, fine-tuning against the linear probe of
    the same encoder (ConMIM: the online encoder, which eval_linear.py reads), LUT against MAE, ConMIM against scratch
    and its own start; each verdict computed from the seed values."""
    mini = miniature("mini_repro")

    def res(lin, **ft):
        return {"train_seconds": 10.0, "train_cpu_seconds": 8.0,
                "eval": {"top1": {"20": 40.0}, "linear_probe": 50.0, "linear_grid": lin},
                "finetune": {name: dict(top1_last=v, top1_best=v + 1, epoch_last=9, epoch_best=8, seconds=20.0,
                                        cpu_seconds=15.0) for name, v in ft.items()}}
    per_seed = {s: {"random-init": res(30 + s, **{"": 50 + s}), "mae": res(40 + s, **{"": 60 + s}),
                    "lut": res(20, **{"": 59 + 2 * s}), "random-init-rel": res(35, **{"": 52}),
                    "conmim": res(30 + s, teacher=51 + s, online=55)} for s in range(3)}
    summary = mini.summarize(per_seed, "20")
    assert summary["conmim"]["finetune"]["online"]["top1"]["mean"] == 55
    assert summary["mae"]["train_cpu_seconds"]["mean"] == 8.0
    rows = {(r["method"], r["number"], r["baseline"], r["baseline_number"]): r for r in mini.ft_compare(summary)}
    r = rows[("mae", "finetune", "random-init", "finetune")]
    assert r["delta"] == 10 and r["paired"] == [10, 10, 10] and r["std"] == 1.0 and r["beyond_2std"]
    assert rows[("conmim", "finetune:online", "conmim", "linear_grid")]["delta"] == 24
    assert ("conmim", "finetune", "conmim", "linear_grid") not in rows  # the teacher is not what the probe read
    r = rows[("lut", "finetune", "mae", "finetune")]
    assert r["delta"] == 0 and not r["beyond_2std"]
    assert mini.verdict(rows[("conmim", "finetune", "random-init-rel", "finetune")], 3) == "no"  # 0 points
    assert mini.verdict(rows[("conmim", "finetune:online", "random-init-rel", "finetune")], 3) == "yes, above"
    preset = dict(mini.PRESETS["full"], finetune_flags=mini.FINETUNE_FLAGS["full"])
    text = "\n".join(mini.finetune_lines(summary, preset, 3))
    assert "| conmim, online | 55.0 +- 0.0 | 56.0 +- 0.0 | 9, 9, 9 | 15 s | 20 s |" in text
    assert "| mae fine-tuned | scratch fine-tuned | +10.0 | 1.0 | +10.0, +10.0, +10.0 | yes, above |" in text
    assert ("- fine-tuning from MAE above fine-tuning from scratch by more than 2 std: **yes** (+10.0 points; 2 std = "
            "2.0; per seed +10.0, +10.0, +10.0)") in text
    assert "LUT against MAE (the paper: ViT-B 84.2 against 83.6): **within 2 std** (+0.0 points; 2 std = 4.0;" in text
    assert "- ConMIM (online encoder) against its own start: **above by more than 2 std** (+3.0 points" in text
    assert ("- fine-tuning above the linear probe of the same encoder by more than 2 std: **yes** for random-init, "
            "mae, lut, random-init-rel, conmim") in text
    table = "\n".join(mini.main_table(summary, "20", 3))
    assert "| conmim | 40.0 +- 0.0 | - | 31.0 +- 1.0 | 50.0 +- 0.0 | 52.0 +- 1.0 | 8 s | 10 s |" in table


def test_mini_repro_lift_against_mae():
    """lifts(): difference of the seed means at the last block and the head blocks, against twice the
    larger seed std; summarize() takes sample stds."""
    mini_repro = miniature("mini_repro")

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


def test_official_conmim_encoder_folds_layer_scale_exactly():
    """official_miniature.to_our_layout: a BEiT encoder with layer scale and q/v biases (timm's Beit, the official
    modeling_finetune layout and names) becomes this repository's ViT with the same tokens after the final norm."""
    from timm.models.beit import Beit
    mod = miniature("official_miniature")
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
    mini = miniature("mini_repro")

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
