"""The copy a user makes: one method file + common.py alone in an empty folder runs its tiny CPU command on an image
folder and --help (checkpointing at epoch ends, said in one line); --plan, --fsdp, --save-minutes and --data synthetic
then say in one line which neighbour to add; with memplan.py, fsdp.py, longrun.py and synthetic.py beside them
--plan 4x80 prints its plan and --fsdp trains sharded under torchrun."""
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, write_image_folder, write_mae_release_checkpoint
from test_hardening import train_flags

SCRIPTS = ("mae", "mae_ct", "mim_refiner", "lut", "conmim")


def run_copy(folder, script, *args, nproc=1):
    args = [str(a) for a in args]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1
           else [sys.executable]) + [f"{script}.py", *args]
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HOME": str(folder)}
    return subprocess.run(cmd, cwd=folder, capture_output=True, text=True, timeout=600, env=env)


def one_error_line(p, *needles):
    lines = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]


def copy(tmp_path, script, neighbours=()):
    folder = tmp_path / f"{script}_copy"
    folder.mkdir()
    for f in (f"{script}.py", "common.py", *neighbours):
        shutil.copy(ROOT / f, folder / f)
    return folder


@pytest.mark.parametrize("script", SCRIPTS)
def test_method_file_and_common_alone_run_the_tiny_command(tmp_path, script):
    folder = copy(tmp_path, script)
    init = tmp_path / "mae.pth"
    write_mae_release_checkpoint(init, img_size=32, patch_size=8)
    data = write_image_folder(tmp_path / "data", classes=("a", "b"), per_class=16, size=32)
    assert run_copy(folder, script, "--help").returncode == 0
    p = run_copy(folder, script, *train_flags(script, folder / "out", init, data=data), "--epochs", "1")
    assert p.returncode == 0, p.stderr[-3000:]
    assert len([x for x in p.stdout.splitlines() if "longrun.py is not beside common.py" in x]) == 1, p.stdout[-3000:]
    assert torch.load(folder / "out" / "checkpoint-last.pth", weights_only=True)["epoch"] >= 1
    assert sorted(x.name for x in folder.glob("*.py")) == sorted([f"{script}.py", "common.py"])  # nothing else needed
    one_error_line(run_copy(folder, script, "--model", "vit_t16", "--plan", "4x80"), "memplan.py")
    one_error_line(run_copy(folder, script, *train_flags(script, folder / "s", init, data=data),
                            "--save-minutes", "1"), "--save-minutes", "longrun.py")
    one_error_line(run_copy(folder, script, *train_flags(script, folder / "d", init, data="synthetic:16:4")),
                   "--data synthetic", "synthetic.py")
    if script in ("mae", "mim_refiner"):
        one_error_line(run_copy(folder, script, *train_flags(script, folder / "f", init, data=data), "--fsdp"), "fsdp.py")
    if script == "mim_refiner":  # the k-NN monitor is eval_knn.py's: without it off in one line, with it on
        for with_knn in (False, True):
            if with_knn:
                shutil.copy(ROOT / "eval_knn.py", folder / "eval_knn.py")
            p = run_copy(folder, script, *train_flags(script, folder / f"k{with_knn}", init, data=data), "--epochs",
                         "1", "--knn-every", "1")
            assert p.returncode == 0, p.stderr[-3000:]
            off = [x for x in p.stdout.splitlines() if "k-NN monitor off: add eval_knn.py beside common.py" in x]
            on = [x for x in p.stdout.splitlines() if "k-NN top-1" in x]
            assert (len(off), bool(on)) == ((0, True) if with_knn else (1, False)), p.stdout[-3000:]


@pytest.mark.parametrize("script", ["mae", "mim_refiner"])
def test_with_the_neighbours_plan_and_fsdp_work(tmp_path, script):
    folder = copy(tmp_path, script, ("memplan.py", "fsdp.py", "longrun.py", "synthetic.py"))
    p = run_copy(folder, script, "--model", "vit_t16", "--img-size", "32", "--patch-size", "8", "--batch-size", "16",
                 "--plan", "4x80")
    assert p.returncode == 0 and [x for x in p.stdout.splitlines() if x.startswith("plan:")], p.stderr[-3000:]
    if script == "mae":  # sharded for real: 2 processes, gloo
        flags = train_flags("mae", folder / "out", None, data="synthetic:16:4")
        p = run_copy(folder, script, *flags, "--epochs", "1", "--fsdp", nproc=2)
        assert p.returncode == 0 and "longrun.py is not beside" not in p.stdout, p.stderr[-3000:]
        sd = torch.load(folder / "out" / "checkpoint-last.pth", weights_only=True)
        assert sd["epoch"] == 1 and "blocks.0.attn.qkv.weight" in sd["model"]


def test_without_memplan_auto_takes_the_static_choice_and_says_so(monkeypatch):
    """No memplan.py: on CUDA `auto` checkpoints every trainable block of ViT-L and larger, none of the smaller
    models, in one printed line; on the CPU it is off (as with the plan); on/off are the user's."""
    import types
    import common
    monkeypatch.setitem(sys.modules, "memplan", None)  # `import memplan` fails as in a copy without it
    said = []
    args = types.SimpleNamespace(plan=None, grad_checkpointing="auto", model="vit_h14", fsdp=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert common.plan_run(args, cuda, 4, 32, None, said.append) == (32, False)
    assert len(said) == 1 and "memplan.py" in said[0] and "32 of 32" in said[0]
    args.model = "vit_b16"
    assert common.plan_run(args, cuda, 4, 12, None, said.append) == (0, False)
    assert common.plan_run(args, cpu, 1, 12, None, said.append) == (0, False) and len(said) == 2
    args.grad_checkpointing = "on"
    assert common.plan_run(args, cpu, 1, 12, None, said.append) == (12, False)
    args.plan = "4x80"
    with pytest.raises(common.UserError, match="memplan.py"):
        common.plan_run(args, cpu, 1, 12, None)


def test_without_longrun_a_mid_epoch_checkpoint_names_the_file(monkeypatch):
    """No longrun.py: epoch-start seeding as with it; a checkpoint saved inside an epoch is refused in one line."""
    import common
    monkeypatch.setitem(sys.modules, "longrun", None)
    info = common.DistInfo()
    assert common.epoch_start(3, 1, info, None) == 0
    first = torch.rand(3)
    common.seed_everything(common.epoch_seed(3, 1, 0))
    assert torch.equal(first, torch.rand(3))
    with pytest.raises(common.UserError, match="inside an epoch.*longrun.py"):
        common.epoch_start(3, 1, info, {"update": 2, "rng": [], "sums": {}})

    class Log:
        lines = []
        print = lines.append
    assert isinstance(common.run_control(None, info, Log), common.EpochEndSaves) and "longrun.py" in Log.lines[0]
    with pytest.raises(common.UserError, match="--save-minutes needs longrun.py"):
        common.run_control(5.0, info, Log)


def test_without_foreign_ours_and_official_mae_load_and_other_layouts_name_the_file(monkeypatch):
    """No foreign.py: our files and official MAE ones (decoder dropped) convert as with it; a data2vec 2.0, MIM-Refiner
    or MAE-CT layout stops in one line naming foreign.py."""
    import common
    import foreign
    vit = common.create_vit("vit_t16", 32, 8)
    ours = vit.state_dict()
    mae = {**ours, "decoder_embed.weight": torch.zeros(2, 2), "mask_token": torch.zeros(1, 1, 192)}
    grid = {k: v for k, v in ours.items() if k != "pos_embed"} | {"pos_embed": ours["pos_embed"][:, 1:]}
    post = common.create_vit("vit_t16", 32, 8, post_norm=True).state_dict()
    stem = {"local_encoder.proj.weight": post["patch_embed.proj.weight"], "local_encoder.proj.bias":
            post["patch_embed.proj.bias"], "extra_tokens": post["cls_token"], "fixed_positional_encoder.positions":
            post["pos_embed"][:, 1:], "context_encoder.norm.weight": post["embed_norm.weight"],
            "context_encoder.norm.bias": post["embed_norm.bias"]}  # fairseq data2vec2.py: blocks at the top level
    others = [grid, {"cls_tokens.tokens": ours["cls_token"], **grid},
              {**{foreign.DATA2VEC2_PREFIX + k: v for k, v in stem.items()},
               **{k: v for k, v in post.items() if k.startswith("blocks.")}}]
    with_file = [common.convert_to_ours(sd) for sd in others]
    monkeypatch.setitem(sys.modules, "foreign", None)
    for sd in (ours, mae):
        out = common.convert_to_ours(sd)
        assert out.keys() == ours.keys() and all(torch.equal(out[k], ours[k]) for k in ours)
    for sd, converted in zip(others, with_file):
        assert torch.equal(converted["pos_embed"], ours["pos_embed"])
        with pytest.raises(common.UserError, match="checkpoint needs foreign.py beside common.py"):
            common.convert_to_ours(sd)


def test_finetune_and_common_alone_fine_tune_an_mae_release(tmp_path):
    folder = copy(tmp_path, "finetune")
    init = tmp_path / "mae.pth"
    enc = write_mae_release_checkpoint(init, img_size=32, patch_size=8)
    data = write_image_folder(tmp_path / "data", classes=("a", "b"), per_class=8, size=32)
    assert run_copy(folder, "finetune", "--help").returncode == 0
    flags = ["--init", init, "--data", data, "--device", "cpu", "--num-workers", "0", "--epochs", "1", "--batch-size",
             "8", "--output-dir", folder / "out"]
    p = run_copy(folder, "finetune", *flags)
    assert p.returncode == 0, p.stderr[-3000:]
    assert torch.load(folder / "out" / "checkpoint-last.pth", weights_only=True)["epoch"] == 1
    assert sorted(x.name for x in folder.glob("*.py")) == ["common.py", "finetune.py"]
    release = {"state_dict": {**{k: v for k, v in enc.state_dict().items() if k not in ("cls_token", "pos_embed")},
                              "cls_tokens.tokens": enc.cls_token, "pos_embed.embed": enc.pos_embed[:, 1:].reshape(
                                  1, 4, 4, -1)}}
    torch.save(release, tmp_path / "refiner.th")
    one_error_line(run_copy(folder, "finetune", *flags[:-2], "--init", tmp_path / "refiner.th", "--output-dir",
                            folder / "r"), "MIM-Refiner release", "foreign.py")
    one_error_line(run_copy(folder, "finetune", *flags[:-2], "--data", "synthetic:16:8", "--output-dir", folder / "s"),
                   "synthetic.py")
