"""Long runs on a shared cluster: checkpoints inside an epoch, stop signals answered with a clean save, and a resume
from any update boundary that equals the uninterrupted run bit for bit, for every script, single process and
torchrun x2 (there with the CUDA run's dtypes, MIMREF_CUDA_DTYPES=1, and activation checkpointing); plus the faults
a hostile run finds (two runs in one folder, an exploded run, a kill during a kept-file write, a full disk, odd
output paths, a symlink loop in the data, host memory held after loading)."""
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import weakref

import pytest
import torch

import common
import longrun
from conftest import (ONE_THREAD, ROOT, TINY, load, run_inprocess, run_script, tensors, write_image_folder,
                      write_mae_release_checkpoint)

CUDA_DTYPES = {**ONE_THREAD, "MIMREF_CUDA_DTYPES": "1"}
RNG = random.Random(26)  # the steps at which the tests stop the runs: fixed per suite run, different per case


def assert_same_checkpoint(a, b):
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys() and len(ta) > 50
    bad = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not bad, bad[:5]
    assert a["epoch"] == b["epoch"] and a["step"] == b["step"] and a["resume"] is None and b["resume"] is None


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    path = tmp_path_factory.mktemp("init") / "mae.pth"
    write_mae_release_checkpoint(path, patch_size=8)
    return path


def flags(name, init):
    """Tiny settings with 4 updates per epoch (2 epochs; MAE-CT / MIM-Refiner: 1 head + 1 tuning epoch)."""
    t = [*TINY, "--patch-size", "8"]
    return {
        "mae": [*t, "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2", "--batch-size", "8",
                "--warmup-epochs", "1", "--blr", "1e-3", "--vis-images", "0", "--data", "synthetic:32:8", "--epochs", "2"],
        "mae_ct": [*t, "--queue-size", "16", "--proj-hidden", "32", "--pred-hidden", "32", "--proj-dim", "16",
                   "--batch-size", "8", "--data", "synthetic:32:8", "--topk", "3", "--init", init, "--head-epochs", "1",
                   "--epochs", "1"],
        "mim_refiner": [*t, "--data", "synthetic:32:8", "--batch-size", "8", "--queue-size", "16", "--topk", "3",
                        "--local-crops", "1", "--head-hidden", "32", "--pred-hidden", "32", "--head-blocks", "10", "11",
                        "--warmup-epochs", "1", "--init", init, "--head-epochs", "1", "--epochs", "1"],
        "lut": [*t, "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2", "--head-hidden-dim", "32",
                "--pred-hidden-dim", "32", "--head-out-dim", "16", "--warmup-epochs", "1", "--data", "synthetic:64:8",
                "--batch-size", "16", "--epochs", "2", "--log-every", "1"],
        "conmim": [*t, "--head-hidden-dim", "32", "--head-out-dim", "16", "--warmup-epochs", "1", "--data",
                   "synthetic:64:8", "--batch-size", "16", "--epochs", "2", "--log-every", "1"],
        "finetune": ["--init", init, "--data", "synthetic:32:8", "--device", "cpu", "--num-workers", "0", "--epochs",
                     "2", "--warmup-epochs", "1", "--batch-size", "8", "--blr", "1e-2"],
    }[name]


def command(script, args, nproc):
    args = [str(a) for a in args]
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                str(ROOT / script), *args]
    return [sys.executable, str(ROOT / script), *args]


def updates_logged(out) -> int:
    try:
        return sum('"train/loss"' in line for line in open(out / "log.jsonl"))
    except FileNotFoundError:
        return 0


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (from /proc)."""
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(d))
    return kids


def rank_pid(torchrun_pid: int, rank: int) -> int:
    for pid in children(torchrun_pid):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    raise AssertionError(f"no rank {rank} under {torchrun_pid}")


def stop_at_random_step(script, args, out, nproc, how, total_updates, env):
    """Start the run, wait until a random number of updates is logged, then SIGTERM / SIGINT / SIGUSR1 (to rank 1
    only under torchrun) or kill -9 (every rank); returns (exit status, stdout, the updates seen)."""
    target = RNG.randint(1, total_updates - 2)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    proc = subprocess.Popen(command(script, [*args, "--output-dir", out], nproc), cwd=ROOT, env=full_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    # kill -9 comes after a time-based save: an update is logged before the save that follows it
    saved = (lambda: (out / "checkpoint-last.pth").exists()) if how == "kill9" else (lambda: True)
    while (updates_logged(out) < target or not saved()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before update {target}:\n{proc.stdout.read()[-3000:]}"
    if how == "kill9":
        victims = children(proc.pid) if nproc > 1 else []
        for pid in [*victims, proc.pid]:
            os.kill(pid, signal.SIGKILL)
    else:
        sig = getattr(signal, how)
        os.kill(rank_pid(proc.pid, 1) if nproc > 1 else proc.pid, sig)
    stdout, _ = proc.communicate(timeout=240)
    return proc.returncode, stdout, target


CASES = [  # (script, processes, how to stop, extra flags): every script both ways; workers, accumulation, k-NN
    ("mae", 1, "SIGTERM", ["--num-workers", "2", "--accum-steps", "2"]),
    ("lut", 1, "SIGINT", ["--num-workers", "1"]),
    ("conmim", 1, "kill9", ["--save-minutes", "1e-6", "--accum-steps", "2"]),
    ("mae_ct", 1, "SIGUSR1", ["--knn-every", "1"]),
    ("mim_refiner", 1, "kill9", ["--save-minutes", "1e-6", "--accum-steps", "2", "--knn-every", "1"]),
    ("mae", 2, "SIGUSR1", ["--grad-checkpointing", "on"]),
    ("lut", 2, "SIGUSR1", ["--grad-checkpointing", "on", "--num-workers", "1"]),
    ("conmim", 2, "SIGUSR1", ["--grad-checkpointing", "on"]),
    ("mae_ct", 2, "SIGUSR1", ["--grad-checkpointing", "on"]),
    ("mim_refiner", 2, "SIGUSR1", ["--grad-checkpointing", "on", "--knn-every", "1"]),
    ("finetune", 1, "kill9", ["--save-minutes", "1e-6", "--accum-steps", "2", "--num-workers", "2"]),
    ("finetune", 2, "SIGUSR1", ["--grad-checkpointing", "on"]),
]


@pytest.mark.parametrize("script,nproc,how,extra", CASES, ids=[f"{c[0]}-x{c[1]}-{c[2]}" for c in CASES])
def test_stopped_at_a_random_step_and_resumed_equals_the_uninterrupted_run(tmp_path, init, script, nproc, how, extra):
    """Signalled (under torchrun: rank 1 only, and both ranks stop at the same boundary) or killed after a time-based
    save, at a random update, then rerun with the same command: the final checkpoint equals an uninterrupted run's
    bit for bit. Two ranks run with the CUDA run's dtypes (bf16 autocast) and activation checkpointing."""
    env = CUDA_DTYPES if nproc > 1 else ONE_THREAD
    args = [*flags(script, init), *extra]
    run_script(f"{script}.py", *args, "--output-dir", tmp_path / "u", nproc=nproc, env=env)
    total = updates_logged(tmp_path / "u")
    code, stdout, target = stop_at_random_step(f"{script}.py", args, tmp_path / "s", nproc, how, total, env)
    if how == "kill9":
        assert code == -signal.SIGKILL
    else:
        lines = [x for x in stdout.splitlines() if x.startswith("stopped by ")]
        assert len(lines) == 1 and lines[0].startswith(f"stopped by {how} ") and "rerun the same command" in lines[0], stdout[-3000:]
        assert code == (longrun.STOPPED_EXIT if nproc == 1 else 1), (code, stdout[-2000:])  # torchrun: a worker failed
    ck = load(tmp_path / "s" / "checkpoint-last.pth")  # the stop's (or the last time-based) save: it loads
    assert not list((tmp_path / "s").glob("*.tmp.*"))
    p = run_script(f"{script}.py", *args, "--output-dir", tmp_path / "s", nproc=nproc, env=env)
    assert "resum" in p.stdout
    assert_same_checkpoint(load(tmp_path / "u" / "checkpoint-last.pth"), load(tmp_path / "s" / "checkpoint-last.pth"))
    assert ck["step"] >= (target if how != "kill9" else 0)


def test_a_signal_during_the_checkpoint_write_or_the_knn_monitor_stops_right_after(tmp_path, capsys, monkeypatch, init):
    """SIGTERM arriving while checkpoint-last.pth is being written (the write completes) and SIGUSR1 while the k-NN
    monitor runs: the run stops at the next boundary with the stop line and a loadable checkpoint; the rerun
    finishes equal to the uninterrupted run."""
    import mim_refiner
    args = [*flags("mim_refiner", init), "--knn-every", "1", "--save-minutes", "1e-6"]
    assert run_inprocess(capsys, mim_refiner, *args, "--output-dir", tmp_path / "u")[0] == 0
    import eval_knn
    real_save, real_vote = torch.save, eval_knn.knn_classify
    for name, target, patch in (("write", "torch", "save"), ("knn", "eval_knn", "knn_classify")):
        fired = []

        def save(obj, f, *a, **kw):  # the signal lands in the middle of the write of the 3rd save
            if "checkpoint-last" in str(getattr(f, "name", f)) and len(fired) < 3:
                fired.append(1)
                if len(fired) == 3:
                    os.kill(os.getpid(), signal.SIGTERM)
            return real_save(obj, f, *a, **kw)

        def vote(*a, **kw):
            if not fired:
                fired.append(1)
                os.kill(os.getpid(), signal.SIGUSR1)
            return real_vote(*a, **kw)
        monkeypatch.setattr(torch if target == "torch" else eval_knn, patch, save if name == "write" else vote)
        code, out, err = run_inprocess(capsys, mim_refiner, *args, "--output-dir", tmp_path / name)
        monkeypatch.setattr(torch, "save", real_save)
        monkeypatch.setattr(eval_knn, "knn_classify", real_vote)
        assert code == longrun.STOPPED_EXIT, err[-2000:]
        stop = [x for x in out.splitlines() if x.startswith("stopped by")]
        assert len(stop) == 1 and ("SIGTERM" if name == "write" else "SIGUSR1") in stop[0], out[-2000:]
        load(tmp_path / name / "checkpoint-last.pth")
        assert run_inprocess(capsys, mim_refiner, *args, "--output-dir", tmp_path / name)[0] == 0
        assert_same_checkpoint(load(tmp_path / "u" / "checkpoint-last.pth"),
                               load(tmp_path / name / "checkpoint-last.pth"))


def test_a_second_sigint_aborts_at_once():
    code = textwrap.dedent("""
        import os, signal, time, common, longrun
        log = common.Logger.__new__(common.Logger); log.active, log.output_dir = False, "x"
        ctl = longrun.RunControl(0, common.DistInfo(), log)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1.2)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
        print("not aborted")
    """)
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 130 and "aborted by a second SIGINT" in p.stderr and "not aborted" not in p.stdout


def test_the_time_based_save_fires_at_the_stated_interval_on_a_faked_clock():
    """--save-minutes 2 on a fake clock: a save at the first boundary 120 s after the last save (epoch ends count),
    none before; the default (None, CUDA) stretches its 30 minutes to 100x the last write's duration."""
    now = [0.0]
    log = common.Logger.__new__(common.Logger)
    log.active, log.output_dir = False, "x"
    saves = []

    def save():
        saves.append(now[0])
        now[0] += 3.0  # the write takes 3 s
    handlers = {s: signal.getsignal(s) for s in common.STOP_SIGNALS}
    def boundary(ctl, update, steps_per_epoch):  # what a script's loop does after an update
        due, stop = ctl.at_update(update, steps_per_epoch)
        assert not stop
        if due:
            with ctl.saving(0, update, steps_per_epoch):
                save()
    try:
        ctl = longrun.RunControl(2.0, common.DistInfo(), log, clock=lambda: now[0])
        for t in range(0, 400, 10):  # a boundary every 10 s
            now[0] = max(now[0], float(t))
            boundary(ctl, 1, 100)
        assert saves == [120.0, 250.0, 380.0]  # 120 s after the last save ended (at 0, 123, 253)
        boundary(ctl, 100, 100)  # the epoch's last update: left to the epoch-end save
        assert len(saves) == 3
        ctl.epoch_done(1)  # the epoch-end save resets the timer
        assert ctl.last_save == now[0]
        default = longrun.RunControl(None, common.DistInfo(device=torch.device("cpu")), log, clock=lambda: now[0])
        assert default.interval == 0  # off on the CPU
        cuda = longrun.RunControl(None, common.DistInfo(), log, clock=lambda: now[0])
        cuda.interval, cuda.write_s = 60 * longrun.SAVE_MINUTES_CUDA, 30.0  # as on CUDA, with a 30 s write
        cuda.last_save, now[0] = 0.0, 1800.0
        assert not cuda._due()  # 30 minutes passed, but a 30 s write may cost at most 1 %: stretched to 3000 s
        now[0] = 3000.0
        assert cuda._due()
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------------------------
# faults: each case failed on the code before these checks
# ---------------------------------------------------------------------------------------------
def test_a_second_run_into_a_live_runs_folder_is_refused_and_waits_for_one_that_is_stopping(tmp_path, init):
    args = [*flags("mae", init), "--epochs", "200", "--output-dir", tmp_path / "run"]
    a = subprocess.Popen(command("mae.py", args, 1), cwd=ROOT, text=True, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, env={**os.environ, **ONE_THREAD})
    try:
        while updates_logged(tmp_path / "run") < 1 and a.poll() is None:
            time.sleep(0.05)
        b = run_script("mae.py", *args, check=False)
        err = [x for x in b.stderr.splitlines() if x.startswith("error:")]
        assert b.returncode == 2 and len(err) == 1 and f"in use by a live run (pid {a.pid}" in err[0], b.stderr[-2000:]
        assert "Traceback" not in b.stderr
    finally:
        a.send_signal(signal.SIGTERM)
        out, _ = a.communicate(timeout=120)
    assert a.returncode == longrun.STOPPED_EXIT and "stopped by SIGTERM" in out
    # a lock whose holder is stopping: the next run waits for it, then takes over; a live one is refused at once
    hold = textwrap.dedent(f"""
        import sys, time, longrun
        lock = longrun.OutputLock({str(tmp_path / 'lk')!r})
        lock.info["state"] = sys.argv[1]; lock._write(); print("held", flush=True); time.sleep(float(sys.argv[2]))
    """)
    (tmp_path / "lk").mkdir()
    for state, expect in (("stopping", "waits"), ("running", "refused")):
        h = subprocess.Popen([sys.executable, "-c", hold, state, "3"], cwd=ROOT, text=True, stdout=subprocess.PIPE)
        assert h.stdout.readline().strip() == "held"
        t0 = time.time()
        if expect == "waits":
            lock = longrun.OutputLock(str(tmp_path / "lk"), wait=30)
            assert time.time() - t0 > 1.5 and lock.info["pid"] == os.getpid()
            lock.release()
        else:
            with pytest.raises(common.UserError, match=f"in use by a live run \\(pid {h.pid}"):
                longrun.OutputLock(str(tmp_path / "lk"), wait=30)
            assert time.time() - t0 < 1.5
        h.wait(timeout=30)


def test_an_exploded_run_never_leaves_a_bad_last_checkpoint(tmp_path, capsys, init):
    """An absurd lr makes the weights huge but finite before any NaN: the save is refused (one error line), so
    the advised rerun with a sane lr resumes from a checkpoint that trains (or starts from scratch)."""
    import mae
    args = [*flags("mae", init), "--save-minutes", "1e-6", "--output-dir", tmp_path / "run"]
    code, out, err = run_inprocess(capsys, mae, *args, "--lr", "1e3")
    line = [x for x in err.splitlines() if "error:" in x]
    assert code == 2 and len(line) == 1, err[-2000:]
    assert "diverged" in line[0], line[0]
    if "still holds the last good state" in line[0]:  # written before the lr warmed up: it really is good
        ck = load(tmp_path / "run" / "checkpoint-last.pth")
        assert common.weights_rms(ck["model"]) < 2 * ck["weights_rms_start"]
    else:
        assert "no checkpoint was written yet" in line[0] and not (tmp_path / "run" / "checkpoint-last.pth").exists()
    code, out, err = run_inprocess(capsys, mae, *args, "--lr", "1e-4")
    assert code == 0, err[-2000:]
    ck = load(tmp_path / "run" / "checkpoint-last.pth")
    assert ck["epoch"] == 2 and common.weights_rms(ck["model"]) < 10 * ck["weights_rms_start"]


def test_a_kill_during_a_kept_checkpoint_write_leaves_no_temp_file_and_the_kept_file_is_written(tmp_path, init):
    wrapper = tmp_path / "kill_in_kept_write.py"
    wrapper.write_text(textwrap.dedent(f"""
        import os, runpy, sys, torch
        real = torch.save
        def save(obj, f, *a, **kw):
            if "checkpoint-epoch001" in str(getattr(f, "name", f)):
                f.write(b"partial"); f.flush(); os._exit(137)  # as kill -9 in the middle of the write
            return real(obj, f, *a, **kw)
        torch.save = save
        sys.argv[0] = {str(ROOT / 'mae.py')!r}
        sys.path.insert(0, {str(ROOT)!r})
        runpy.run_path(sys.argv[0], run_name="__main__")
    """))
    args = [*flags("mae", init), "--save-every", "1", "--output-dir", tmp_path / "run"]
    p = subprocess.run([sys.executable, str(wrapper), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, **ONE_THREAD}, timeout=300)
    assert p.returncode == 137 and list((tmp_path / "run").glob("checkpoint-epoch001.pth.tmp.*"))
    run_script("mae.py", *args)
    assert not list((tmp_path / "run").glob("*.tmp.*"))
    assert load(tmp_path / "run" / "checkpoint-epoch001.pth")["epoch"] == 1
    assert load(tmp_path / "run" / "checkpoint-epoch002.pth")["epoch"] == 2


def test_a_full_disk_is_one_line_and_the_previous_checkpoint_stays(tmp_path, init):
    """The write limit of the process (RLIMIT_FSIZE, as a full disk: torch's zip writer raises a RuntimeError)
    below a checkpoint's size: exit 2, one error line saying to free space, no traceback, the previous file loads."""
    import resource
    args = [*flags("mae", init), "--output-dir", tmp_path / "run"]
    run_script("mae.py", *args, "--epochs", "1")

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    p = subprocess.run(command("mae.py", args, 1), cwd=ROOT, capture_output=True, text=True, preexec_fn=limit,
                       env={**os.environ, **ONE_THREAD}, timeout=300)
    err = [x for x in p.stderr.splitlines() if "error:" in x]  # (after the progress bar on its line)
    assert p.returncode == 2 and len(err) == 1 and "free space" in err[0] and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert load(tmp_path / "run" / "checkpoint-last.pth")["epoch"] == 1
    assert not list((tmp_path / "run").glob("*.tmp.*"))


def test_odd_output_paths_are_refused_at_start(tmp_path, capsys, init):
    import mae
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "dirckpt" / "checkpoint-last.pth").mkdir(parents=True)
    for out, needle in (("", "--output-dir is empty"), (tmp_path / "dangling", "is a symlink to"),
                        (tmp_path / "dirckpt", "checkpoint-last.pth is a folder")):
        code, stdout, err = run_inprocess(capsys, mae, *flags("mae", init), "--output-dir", out)
        line = [x for x in err.splitlines() if "error:" in x]
        assert code == 2 and len(line) == 1 and needle in line[0], err[-1500:]
        assert "epoch 0" not in stdout  # refused before any training
    assert not (tmp_path / "nowhere").exists()


def test_a_symlink_loop_in_a_class_folder_is_refused(tmp_path, capsys):
    import eval_knn
    import mae
    root = write_image_folder(tmp_path / "imgs", per_class=4)
    (root / "train" / "a" / "again").symlink_to(root / "train" / "a")
    code, _, err = run_inprocess(capsys, mae, *TINY, "--data", root, "--output-dir", tmp_path / "out", "--epochs", "1")
    line = [x for x in err.splitlines() if "error:" in x]
    assert code == 2 and len(line) == 1 and "symlink" in line[0] and "again" in line[0], err[-1500:]
    code, _, err = run_inprocess(capsys, eval_knn, "--checkpoint", "none", "--model", "vit_t16", "--img-size", "32",
                                 "--patch-size", "4", "--data", root, "--device", "cpu", "--num-workers", "0")
    assert code == 2 and "symlink" in err, err[-1500:]


@pytest.mark.parametrize("name", ["mae", "mae_ct", "mim_refiner", "lut", "conmim"])
def test_no_rank_keeps_the_resume_state_or_the_init_file_after_loading(tmp_path, capsys, monkeypatch, init, name):
    """Every weight read from --init and from checkpoint-last.pth is freed once it is in the modules (the optimizer
    keeps its own moments; the small resume position is kept): for ViT-H the loaded dicts are about 15 GB per rank."""
    import importlib
    module = importlib.import_module(name)
    args = [*flags(name, init), "--output-dir", tmp_path / "run"]
    refs, alive = [], []
    real_load, real_progress = common.load_file, common.progress

    def tracked_load(path):
        sd = real_load(path)
        kept = {k: v for k, v in sd.items() if k not in ("optimizer", "resume")} if isinstance(sd, dict) else sd
        refs.extend(weakref.ref(t) for t in tensors(kept).values())
        return sd

    def progress(*a, **kw):  # an epoch starts: what of the loaded files is still alive?
        import gc
        gc.collect()
        alive.append(sum(r() is not None for r in refs))
        return real_progress(*a, **kw)
    monkeypatch.setattr(common, "load_file", tracked_load)
    monkeypatch.setattr(common, "progress", progress)
    assert run_inprocess(capsys, module, *args, "--exit-after-epochs", "1")[0] == 0  # from --init (or scratch)
    assert run_inprocess(capsys, module, *args)[0] == 0  # resumed
    assert len(refs) > 50 and alive and not any(alive), (len(refs), alive)


def test_a_bad_image_with_loader_workers_ends_in_seconds(tmp_path):
    """Loader workers ignore the stop signals (SLURM signals the whole process group): after a worker's error line
    the exit must not wait for them forever, single process and under torchrun."""
    data = write_image_folder(tmp_path / "data", classes=("a", "b"), per_class=16, size=32)
    with open(data / "train" / "a" / "3.png", "wb") as f:
        f.write(b"not a png" * 20)
    for nproc in (1, 2):
        t0 = time.time()
        p = run_script("mae.py", *flags("mae", None), "--data", data, "--num-workers", "2", "--epochs", "1",
                       "--output-dir", tmp_path / f"out{nproc}", nproc=nproc, check=False, timeout=120)
        lines = [x for x in p.stderr.splitlines() if "error: cannot read image" in x]
        assert p.returncode != 0 and len(lines) == 1 and "3.png" in lines[0], p.stderr[-2000:]
        assert time.time() - t0 < 60, time.time() - t0
        assert not (tmp_path / f"out{nproc}").exists()


HOLD = textwrap.dedent("""
    import os, shutil, sys, time, longrun
    out, state, secs, new = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    os.makedirs(out, exist_ok=True)
    lock = longrun.OutputLock(out)
    lock.info["state"] = state; lock._write(); open(os.path.join(out, "holder.txt"), "w").write("mine")
    print("held", flush=True)
    time.sleep(secs)
    if new != "-":  # the stop checkpoint of a requeued job, written while the next one waits
        shutil.copyfile(new, os.path.join(out, "new.tmp")); os.replace(os.path.join(out, "new.tmp"),
                                                                        os.path.join(out, "checkpoint-last.pth"))
""")


def test_a_run_that_loses_the_race_for_a_new_folder_removes_nothing(tmp_path, capsys, monkeypatch):
    """The folder does not exist when run B starts; another run creates it and takes the lock while B starts up.
    Whoever loses, the winner's folder stays."""
    import mae
    out, real_init = tmp_path / "run", common.init_distributed
    holder = []

    def init_then_race(device):  # the other run gets there first, between B's start and its first look inside
        holder.append(subprocess.Popen([sys.executable, "-c", HOLD, str(out), "running", "20", "-"], cwd=ROOT,
                                       text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        holder[0].stdout.readline()
        return real_init(device)
    monkeypatch.setattr(common, "init_distributed", init_then_race)
    try:
        code, _, err = run_inprocess(capsys, mae, *flags("mae", None), "--epochs", "1", "--output-dir", out)
        assert out.is_dir(), (code, err[-2000:])
        if code == 2:  # B lost: the holder's folder is intact
            assert "in use by a live run" in err and (out / "holder.txt").is_file()
        else:  # B won (it claims the folder first): the other run was refused
            assert code == 0 and (out / "checkpoint-last.pth").is_file()
    finally:
        holder[0].kill()
        holder[0].wait()


def test_a_requeued_run_resumes_the_checkpoint_its_stopping_predecessor_writes(tmp_path, capsys):
    """A requeued job starts while its predecessor writes the stop checkpoint: it waits for the lock and resumes
    that checkpoint, not the older one that was there when it started."""
    import mae
    args = [*flags("mae", None), "--epochs", "3"]
    for e in (1, 2):
        assert run_inprocess(capsys, mae, *args, "--exit-after-epochs", e, "--output-dir", tmp_path / f"e{e}")[0] == 0
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint-last.pth").write_bytes((tmp_path / "e1" / "checkpoint-last.pth").read_bytes())
    (out / "args.json").write_bytes((tmp_path / "e1" / "args.json").read_bytes())
    h = subprocess.Popen([sys.executable, "-c", HOLD, str(out), "stopping", "3", str(tmp_path / "e2" / "checkpoint-last.pth")],
                         cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert h.stdout.readline().strip() == "held"
        code, out_text, err = run_inprocess(capsys, mae, *args, "--output-dir", out)
        assert code == 0, err[-2000:]
        assert "resuming" in out_text and "at epoch 2" in out_text, out_text[-2000:]
    finally:
        h.kill()
        h.wait()
    assert load(out / "checkpoint-last.pth")["epoch"] == 3
