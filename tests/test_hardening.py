"""Hostile-user cases, one table per class: bad flags, data that is not what it seems, NaN states, changed
flags on resume, foreign/empty/truncated checkpoints, unusable output paths, images that cannot be converted
faithfully, and an error met by one rank under torchrun. Each case asserts exit status 2, exactly one
`error:` line naming the problem, no traceback and no file left behind (docs/guarantees.md)."""
import dataclasses
import errno
import hashlib
import math
import os
import shutil
import subprocess
import sys
import textwrap
import typing

import numpy as np
import pytest
import torch
from PIL import Image

import common
import synthetic
import conmim
import eval_knn
import lut
import mae
import mae_ct
import mim_refiner
from conftest import ROOT, TINY, run_inprocess, run_script, write_image_folder, write_mae_release_checkpoint

SCRIPTS = {"mae": mae, "mae_ct": mae_ct, "mim_refiner": mim_refiner, "lut": lut, "conmim": conmim}
ALL = {**SCRIPTS, "eval_knn": eval_knn}
# numeric flags without a range: any integer is valid (seeds; eval_knn --block and mim_refiner --head-blocks
# take negative indices and are checked against the model depth)
UNBOUNDED = {"seed", "block", "head_blocks"}


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("init") / "mae_t8.pth"
    write_mae_release_checkpoint(path, model_name="vit_t16", img_size=32, patch_size=8)
    return path


def train_flags(name, out, init, data=None):
    """Tiny 2-step-per-epoch settings per script (each test file's own E2E flags)."""
    t = [*TINY, "--patch-size", "8", "--output-dir", out]
    syn16, syn32 = data or "synthetic:16:4", data or "synthetic:32:8"
    return {
        "mae": [*t, "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2", "--batch-size", "8",
                "--warmup-epochs", "1", "--blr", "1e-3", "--vis-images", "0", "--data", syn16, "--epochs", "2"],
        "mae_ct": [*t, "--queue-size", "16", "--proj-hidden", "32", "--pred-hidden", "32", "--proj-dim", "16",
                   "--batch-size", "8", "--data", syn16, "--topk", "3", "--init", init, "--head-epochs", "1",
                   "--epochs", "1"],
        "mim_refiner": [*t, "--data", syn16, "--batch-size", "8", "--queue-size", "16", "--topk", "3", "--local-crops", "1",
                        "--head-hidden", "32", "--pred-hidden", "32", "--head-blocks", "10", "11", "--warmup-epochs",
                        "1", "--init", init, "--head-epochs", "1", "--epochs", "1"],
        "lut": [*t, "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2", "--head-hidden-dim", "32",
                "--pred-hidden-dim", "32", "--head-out-dim", "16", "--warmup-epochs", "1", "--data", syn32,
                "--batch-size", "16", "--epochs", "2"],
        "conmim": [*t, "--head-hidden-dim", "32", "--head-out-dim", "16", "--warmup-epochs", "1", "--data", syn32,
                   "--batch-size", "16", "--epochs", "2"],
    }[name]


def snapshot(root):
    return {str(p.relative_to(root)): (hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


def assert_one_line_error(code, err, *needles):
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert code == 2, (code, err[-2000:])
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def run_case(capsys, tmp_path, module, argv, *needles, strict=True):
    """Run in-process; one error line; `strict`: not a file created or changed under tmp_path."""
    before = snapshot(tmp_path)
    code, _, err = run_inprocess(capsys, module, *argv)
    line = assert_one_line_error(code, err, *needles)
    after = snapshot(tmp_path)
    if strict:
        assert after == before, set(after.items()) ^ set(before.items())
    else:  # met inside the training loop of a resumed run: its log grows, no new checkpoint or temp file
        assert not [k for k in after if "checkpoint" in k and k not in before], after
    return line


# ==============================================================================================
# class 2: every numeric and choice flag has a declared range, checked at start-up
# ==============================================================================================
@pytest.mark.parametrize("name", ALL)
def test_every_numeric_flag_declares_its_range(name):
    hints = typing.get_type_hints(ALL[name].Args, include_extras=True)
    for f in dataclasses.fields(ALL[name].Args):
        tp, _, _, meta = common._field_spec(hints[f.name])
        if tp in (int, float) and f.name not in UNBOUNDED:
            assert any(isinstance(m, common.Range) for m in meta), f"{name}.py --{f.name} has no declared range"
    assert "Literal" in str(hints["device"])


def _outside(r: common.Range, tp):
    """Values just outside the declared interval."""
    step = 1 if tp is int else 1e-3
    out = []
    if r.lo != -math.inf:
        out.append(r.lo if r.lo_open else r.lo - step)
    if r.hi != math.inf:
        out.append(r.hi if r.hi_open else r.hi + step)
    return out


def _flag_cases():
    for name, module in ALL.items():
        hints = typing.get_type_hints(module.Args, include_extras=True)
        for f in dataclasses.fields(module.Args):
            tp, _, _, meta = common._field_spec(hints[f.name])
            for m in meta:
                if isinstance(m, common.Range):
                    for v in _outside(m, tp):
                        yield name, f.name, str(v), "must"
                elif isinstance(m, tuple):
                    yield name, f.name, "bogus", "choose one of"
            if tp is float:
                yield name, f.name, "nan", "finite"
                yield name, f.name, "inf", "finite"


def test_out_of_range_flags_give_one_line_at_parse_time(capsys):
    cases = list(_flag_cases())
    assert len(cases) > 250
    for name, field, value, needle in cases:
        flag = "--" + field.replace("_", "-")
        with pytest.raises(SystemExit) as e:
            common.parse_args(ALL[name].Args, [flag, value])
        err = capsys.readouterr().err
        assert_one_line_error(e.value.code, err, flag, needle)


@pytest.mark.parametrize("name, extra, needle", [
    ("mae", ["--lr", "-1"], "--lr -1.0: must be > 0"),
    ("mae_ct", ["--lr", "-1"], "--lr -1.0: must be > 0"),
    ("mim_refiner", ["--lr", "-1"], "--lr -1.0: must be > 0"),
    ("lut", ["--lr", "nan"], "--lr nan: must be a finite number"),
    ("conmim", ["--warmup-epochs", "nan"], "--warmup-epochs"),
    ("mae", ["--num-workers", "-1"], "--num-workers -1"),
    ("mae", ["--img-size", "0"], "--img-size 0"),
    ("lut", ["--batch-size", "0"], "--batch-size 0"),
    ("mae", ["--decoder-heads", "0"], "--decoder-heads 0"),
    ("mae", ["--warmup-epochs", "nan"], "--warmup-epochs nan"),
    ("mim_refiner", ["--batch-size", "1"], "exactly 0"),
    ("mim_refiner", ["--batch-size", "8", "--accum-steps", "8"], "1 image per step"),
    ("mae_ct", ["--batch-size", "1"], "BatchNorm"),
    ("lut", ["--batch-size", "1"], "BatchNorm needs at least 2"),
    ("conmim", ["--batch-size", "0"], "--batch-size 0"),
    ("mae", ["--device", "gpu"], "choose one of auto, cpu, cuda"),
    ("mae_ct", ["--aug", "randaug"], "--aug"),
    ("lut", ["--crop", "center"], "--crop"),
    ("conmim", ["--mask-type", "random"], "--mask-type"),
    ("eval_knn", ["--k", "10", "0"], "--k 10 0"),
    ("eval_knn", ["--temperature", "0"], "--temperature"),
    ("mae", ["--img-size", "abc"], "--img-size"),
    # range of a data spec: synthetic counts
    ("mae", ["--data", "synthetic:-5"], "positive counts"),
    ("mae_ct", ["--data", "synthetic:0:4"], "positive counts"),
    ("mim_refiner", ["--data", "synthetic:16:x"], "positive counts"),
    ("lut", ["--data", "synthetic:-5"], "positive counts"),
    ("conmim", ["--data", "synthetic:8:4:2"], "positive counts"),
    ("eval_knn", ["--checkpoint", "none", "--model", "vit_t16", "--data", "synthetic:5:-1"], "positive counts"),
])
def test_bad_flag_values(capsys, tmp_path, init_ckpt, name, extra, needle):
    base = train_flags(name, tmp_path / "out", init_ckpt) if name in SCRIPTS else [*TINY, "--patch-size", "8"]
    run_case(capsys, tmp_path, ALL[name], [*base, *extra], needle)


# ==============================================================================================
# class 3: a folder whose name starts with "synthetic" is a folder
# ==============================================================================================
def test_synthetic_is_an_exact_spec(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_image_folder(tmp_path / "synthetic_photos", classes=("a", "b"), per_class=2, splits=("train",))
    ds = common.build_dataset("synthetic_photos", "train", None)
    assert not isinstance(ds, synthetic.SyntheticShapes) and len(ds) == 4 and ds.classes == ["a", "b"]
    assert synthetic.parse_synthetic("synthetic") == (2000, 500) and synthetic.parse_synthetic("synthetic:7") == (7, 500)
    for spec in ("synthetic_photos", "synthetic2", "synthetics:3", "./synthetic"):
        assert synthetic.parse_synthetic(spec) is None
    with pytest.raises(common.UserError, match="does not exist"):
        common.build_dataset("synthetic_missing", "train", None)


# ==============================================================================================
# class 4: a NaN on the last step of an epoch never reaches the checkpoint
# ==============================================================================================
def _inject_nan_on_step(monkeypatch, k):
    """Every AdamW made by common.make_adamw writes NaN into its first parameter on the k-th step overall."""
    calls = [0]
    real = common.make_adamw

    def make(*a, **kw):
        opt = real(*a, **kw)
        step = opt.step

        def poisoned(*sa, **skw):
            out = step(*sa, **skw)
            calls[0] += 1
            if calls[0] == k:
                with torch.no_grad():
                    opt.param_groups[0]["params"][0].fill_(float("nan"))
            return out
        opt.step = poisoned
        return opt
    monkeypatch.setattr(common, "make_adamw", make)


@pytest.mark.parametrize("name", SCRIPTS)
def test_nan_on_last_step_keeps_previous_checkpoint(capsys, tmp_path, monkeypatch, init_ckpt, one_thread, name):
    out = tmp_path / "out"
    argv = train_flags(name, out, init_ckpt)
    code, _, err = run_inprocess(capsys, SCRIPTS[name], *argv, "--exit-after-epochs", "1")
    assert code == 0, err[-2000:]
    ck = out / "checkpoint-last.pth"
    digest = hashlib.sha1(ck.read_bytes()).hexdigest()
    _inject_nan_on_step(monkeypatch, 2)  # the resumed run's epoch has 2 steps: the last one
    code, _, err = run_inprocess(capsys, SCRIPTS[name], *argv)
    line = assert_one_line_error(code, err, "diverged", f"{ck} still holds the last good state")
    assert hashlib.sha1(ck.read_bytes()).hexdigest() == digest, line
    state = common.load_file(str(ck))
    assert state["epoch"] == 1 and common.checked_cpu_copy(state)[1] is None
    assert not list(out.glob("*.tmp.*"))


def test_nan_loss_message_names_an_existing_checkpoint_or_none(tmp_path):
    with pytest.raises(common.UserError, match="no checkpoint was written yet") as e:
        common.check_finite(torch.tensor(float("nan")), 3, str(tmp_path))
    assert "rerun" in str(e.value)
    common.save_checkpoint(common.checkpoint_path(str(tmp_path)), {"w": torch.ones(2)})
    with pytest.raises(common.UserError, match="the last checkpoint .*checkpoint-last.pth passed the divergence checks"):
        common.check_finite(torch.tensor(float("inf")), 3, str(tmp_path))


# ==============================================================================================
# class 5: resume with changed flags / another script's checkpoint
# ==============================================================================================
@pytest.fixture(scope="module")
def trained(tmp_path_factory, init_ckpt):
    """One finished epoch per script: {name: output dir}."""
    dirs = {}
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    for name, module in SCRIPTS.items():
        out = tmp_path_factory.mktemp(name) / "out"
        module.main(common.parse_args(module.Args, [str(a) for a in train_flags(name, out, init_ckpt)]
                                      + ["--exit-after-epochs", "1"]))
        dirs[name] = out
    torch.set_num_threads(n)
    return dirs


RESUME_CASES = [
    ("mae", ["--model", "vit_s16"], "--model vit_t16 but this run asks for --model vit_s16"),
    ("mae", ["--img-size", "48"], "--img-size 32 but this run asks for --img-size 48"),
    ("mae", ["--decoder-dim", "64", "--decoder-heads", "2"], "--decoder-dim 32"),
    ("mae", ["--batch-size", "16"], "--batch-size 8 but"),
    ("mae_ct", ["--proj-dim", "32"], "--proj-dim 16"),
    ("mae_ct", ["--batch-size", "4"], "--batch-size 8"),
    ("mim_refiner", ["--head-hidden", "64"], "--head-hidden 32"),
    ("mim_refiner", ["--patch-size", "4"], "--patch-size 8"),
    ("mim_refiner", ["--head-blocks", "-1"], "--head-blocks [10, 11] but this run asks for --head-blocks [11]"),
    ("lut", ["--head-out-dim", "8"], "--head-out-dim 16"),
    ("lut", ["--decoder-depth", "2"], "--decoder-depth 1"),
    ("conmim", ["--head-out-dim", "32"], "--head-out-dim 16"),
    ("conmim", ["--pos-embed", "abs"], "--pos-embed rel"),
]


@pytest.mark.parametrize("name, extra, needle", RESUME_CASES)
def test_resume_with_changed_shape_flag_is_refused(capsys, tmp_path, trained, init_ckpt, name, extra, needle):
    out = tmp_path / "out"
    shutil.copytree(trained[name], out)
    line = run_case(capsys, tmp_path, SCRIPTS[name], [*train_flags(name, out, init_ckpt), *extra], needle)
    assert "--output-dir" in line


@pytest.mark.parametrize("name", SCRIPTS)
def test_another_scripts_checkpoint_is_refused(capsys, tmp_path, trained, init_ckpt, name):
    other = "conmim" if name == "mae" else "mae"
    out = tmp_path / "out"
    shutil.copytree(trained[other], out)
    run_case(capsys, tmp_path, SCRIPTS[name], train_flags(name, out, init_ckpt), "was not written by",
             "--output-dir")


def test_resume_with_changed_seed_or_epochs_warns(tmp_path, trained, capsys):
    state = common.load_file(str(trained["mae"] / "checkpoint-last.pth"))
    args = dataclasses.replace(mae.Args(**state["args"]), seed=1, epochs=5, num_workers=3)
    capsys.readouterr()
    common.check_resume_args(state, args, str(trained["mae"]))
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all(ln.startswith("warning: resuming") for ln in out), out
    assert "--seed 1 (it was trained with 0)" in out[1] and "crops/masks" in out[1]
    assert "--epochs 5 (it was trained with 2)" in out[0] and "re-stretched" in out[0]


def test_resume_in_another_precision_says_so(tmp_path, trained, capsys, init_ckpt, monkeypatch):
    """An fp32 checkpoint resumed with the CUDA run's dtypes (bf16 autocast) goes on, with one warning line."""
    out = tmp_path / "out"
    shutil.copytree(trained["mae"], out)
    monkeypatch.setenv(common.CUDA_DTYPES_ENV, "1")
    code, stdout, err = run_inprocess(capsys, mae, *train_flags("mae", out, init_ckpt))
    assert code == 0, err[-2000:]
    warn = [x for x in stdout.splitlines() if x.startswith("warning:") and "bf16" in x]
    assert len(warn) == 1 and "was trained with fp32" in warn[0], stdout[-3000:]
    monkeypatch.delenv(common.CUDA_DTYPES_ENV)
    shutil.rmtree(out)
    shutil.copytree(trained["mae"], out)  # the same precision: no word
    code, stdout, _ = run_inprocess(capsys, mae, *train_flags("mae", out, init_ckpt))
    assert code == 0 and "was trained with" not in stdout


# ==============================================================================================
# class 6: checkpoint files: empty, truncated, stale temp files, failed writes, fsync
# ==============================================================================================
@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("kind", ["empty", "truncated"])
def test_empty_or_truncated_resume_checkpoint(capsys, tmp_path, trained, init_ckpt, name, kind):
    out = tmp_path / "out"
    out.mkdir()
    good = (trained[name] / "checkpoint-last.pth").read_bytes()
    (out / "checkpoint-last.pth").write_bytes(b"" if kind == "empty" else good[:len(good) // 2])
    needle = "is empty (0 bytes" if kind == "empty" else "cannot load"
    run_case(capsys, tmp_path, SCRIPTS[name], train_flags(name, out, init_ckpt), needle, "delete it")


def test_stale_temp_files_removed_and_writes_fsynced(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-last.pth"
    dead = tmp_path / "checkpoint-last.pth.tmp.4194305"  # above Linux's pid_max: no such process
    alive = tmp_path / f"checkpoint-last.pth.tmp.{1}"  # init is alive
    dead.write_bytes(b"x" * 1000)
    alive.write_bytes(b"x")
    synced = []
    real_fsync = common.os.fsync
    monkeypatch.setattr(common.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    common.save_checkpoint(str(path), {"w": torch.arange(3.0)})
    assert len(synced) == 2  # the file, then its folder
    assert torch.equal(common.load_file(str(path))["w"], torch.arange(3.0))
    common.check_output_path(str(tmp_path), "--output-dir", folder=True)  # each start frees the space before it trains
    assert not dead.exists() and alive.exists()


def test_failed_write_leaves_previous_checkpoint_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-last.pth"
    common.save_checkpoint(str(path), {"w": torch.ones(2)})
    before = path.read_bytes()

    def full_disk(obj, f, *a, **kw):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(common.torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left on device") as e:  # run_main makes it one line naming the file
        common.save_checkpoint(str(path), {"w": torch.zeros(2)})
    assert e.value.filename == str(path) and e.value.mimref_flag == "--output-dir"
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-last.pth"]
    # a non-finite state is refused before anything is written
    monkeypatch.undo()
    with pytest.raises(common.UserError, match="'optimizer.state.0.exp_avg' holds nan/inf"):
        common.save_checkpoint(str(path), {"optimizer": {"state": {0: {"exp_avg": torch.tensor([1.0, math.inf])}}}})
    assert path.read_bytes() == before


def test_full_disk_during_training_is_one_line(capsys, tmp_path, monkeypatch, one_thread):
    def full_disk(obj, f, *a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(common.torch, "save", full_disk)
    out = tmp_path / "out"
    run_case(capsys, tmp_path, mae, [*train_flags("mae", out, None), "--epochs", "1"], "No space left on device",
             "--output-dir", strict=False)
    assert not list(out.glob("checkpoint*"))


# ==============================================================================================
# class 7: unusable output paths, checked before the heavy work
# ==============================================================================================
@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("kind", ["file", "under_file"])
def test_output_dir_not_a_folder(capsys, tmp_path, init_ckpt, name, kind):
    f = tmp_path / "taken"
    f.write_text("a file")
    out = f if kind == "file" else f / "sub"
    run_case(capsys, tmp_path, SCRIPTS[name], train_flags(name, out, init_ckpt), "--output-dir", "not a folder")


@pytest.mark.skipif(common.os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_dir_read_only(capsys, tmp_path, init_ckpt):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        run_case(capsys, tmp_path, mae, train_flags("mae", ro / "out", init_ckpt), "cannot write in")
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("flag, target", [("--save-features", "file/x.pth"), ("--output-json", "dir"),
                                          ("--plot", "file/plot.png")])
def test_eval_knn_output_paths_checked_before_extraction(capsys, tmp_path, monkeypatch, flag, target):
    (tmp_path / "file").write_text("a file")
    (tmp_path / "dir").mkdir()
    monkeypatch.setattr(eval_knn, "extract_features", lambda *a, **k: pytest.fail("extraction started"))
    run_case(capsys, tmp_path, eval_knn, ["--checkpoint", "none", *TINY, "--data", "synthetic:10:10", flag,
                                          tmp_path / target], flag)


# ==============================================================================================
# class 8: images that cannot be converted faithfully
# ==============================================================================================
def test_image_modes_convert_faithfully_or_are_refused(tmp_path):
    g16 = np.array([[0, 257 * 100, 65535, 40000]], dtype=np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")  # I;16 PNG
    Image.fromarray(g16).save(tmp_path / "g16.tif")  # I;16 TIFF
    rgb = np.array([[[200, 10, 30], [0, 255, 128], [7, 7, 7], [90, 180, 45]]], dtype=np.uint8)
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(tmp_path / "p.png")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb[..., 0]).convert("LA").save(tmp_path / "la.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    want16 = np.round(g16[0] / 257.0)
    for f in ("g16.png", "g16.tif"):
        img = common._pil_loader(str(tmp_path / f))
        assert img.mode == "RGB" and np.array_equal(np.asarray(img)[0, :, 0], want16), f
    assert np.array_equal(np.asarray(common._pil_loader(str(tmp_path / "p.png"))), rgb)
    assert np.array_equal(np.asarray(common._pil_loader(str(tmp_path / "rgba.png"))), rgb)
    assert np.array_equal(np.asarray(common._pil_loader(str(tmp_path / "la.png")))[0, :, 1], rgb[0, :, 0])
    assert np.abs(np.asarray(common._pil_loader(str(tmp_path / "cmyk.jpg"))).astype(int) - rgb).max() <= 3
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(tmp_path / "f.tif")
    for f in ("f.tif",):
        with pytest.raises(common.UserError, match=f"{f} \\(mode F\\).*8-bit"):
            common._pil_loader(str(tmp_path / f))


@pytest.mark.parametrize("name", [*SCRIPTS, "eval_knn"])
def test_float_image_in_data_folder_is_one_line(capsys, tmp_path, init_ckpt, one_thread, name):
    data = write_image_folder(tmp_path / "data", classes=("a", "b"), per_class=8, size=32)
    bad = data / "train" / "a" / "3.tif"
    Image.fromarray(np.full((32, 32), 0.5, np.float32)).save(bad)
    if name == "eval_knn":
        argv = ["--checkpoint", "none", *TINY, "--data", data]
    else:
        argv = train_flags(name, tmp_path / "out", init_ckpt, data=str(data))
    run_case(capsys, tmp_path, ALL[name], argv, str(bad), "mode F", strict=name == "eval_knn")


# ==============================================================================================
# class 1: under torchrun the rank that meets the problem prints it; the others stop quietly
# ==============================================================================================
def test_torchrun_bad_image_read_only_by_rank1(tmp_path):
    data = tmp_path / "flat"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / f"{i:02d}.png")
    ds = common.FlatImageFolder(str(data))
    order = {r: list(torch.utils.data.DistributedSampler(ds, 2, r, shuffle=True, seed=0, drop_last=True))
             for r in (0, 1)}
    bad_index = order[1][-1]  # read by rank 1 in the last step of the epoch, never by rank 0
    assert bad_index not in order[0]
    bad = ds.samples[bad_index]
    with open(bad, "wb") as f:
        f.write(b"not a png" * 20)
    p = run_script("mae.py", *train_flags("mae", tmp_path / "out", None, data=str(data)), "--epochs", "1",
                   nproc=2, check=False)
    lines = [ln for ln in p.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1 and lines[0].startswith("[rank 1] error: cannot read image") and bad in lines[0], p.stderr
    # no worker traceback (the launcher's own ChildFailedError report is torchrun's, not ours)
    assert 'mae.py", line' not in p.stderr and "Connection closed by peer" not in p.stderr, p.stderr
    assert not (tmp_path / "out" / "checkpoint-last.pth").exists()


def test_dataloader_worker_death_is_one_line(capsys, monkeypatch):
    class Dies(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            common.os._exit(1)  # as the OOM killer would

    def main(args):
        for _ in torch.utils.data.DataLoader(Dies(), num_workers=1):
            pass

    @dataclasses.dataclass
    class A:
        x: int = 0
    monkeypatch.setattr(common.sys, "argv", ["x.py"])
    with pytest.raises(SystemExit) as e:
        common.run_main(main, A)
    assert_one_line_error(e.value.code, capsys.readouterr().err, "data-loading worker", "--num-workers")


def test_a_collective_failing_on_every_rank_names_its_cause(tmp_path):
    """A misconfigured NCCL fails the first collective on all ranks at once: no rank has an error line of its own,
    so the note each prints must carry the backend's message (a peer that exited is named by its own line)."""
    script = tmp_path / "fails.py"
    script.write_text(textwrap.dedent(f"""
        import dataclasses, sys
        sys.path.insert(0, {str(ROOT)!r})
        import torch, torch.distributed as dist, common

        @dataclasses.dataclass
        class A(common.Flags):
            device: str = "cpu"

        def main(args):
            common.init_distributed("cpu")
            raise dist.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled system error")

        common.run_main(main, A)
    """))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    notes = [x for x in p.stderr.splitlines() if "stopped: a collective failed" in x]
    # one note at least: torchrun ends the other rank as soon as the first exits, perhaps before it prints
    assert p.returncode != 0 and 1 <= len(notes) <= 2 and "another process failed" not in p.stderr, p.stderr[-3000:]
    assert all("DistBackendError: NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled system error" in x for x in notes)
    assert "Traceback" not in "".join(x for x in p.stderr.splitlines() if "[rank" in x)
