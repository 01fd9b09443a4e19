"""Long runs: saves inside an epoch, preemption signals, exact resume from any update boundary (optional neighbour
of common.py, imported by common.run_control; without this file a run checkpoints at epoch ends only), and the
output-folder lock (OutputLock, taken by common.run_main; without this file nothing keeps a second run out).

At every update boundary (after an optimizer step, never inside an accumulation cycle) the training loop asks
RunControl.at_update, one all-reduce over the ranks, whether a stop signal arrived on any of them or the time-based
save is due (rank 0's clock); all ranks then save (the loop calls its save_state) and/or stop at the same boundary.
A mid-epoch checkpoint holds, besides the epoch-end state, "resume": the updates done in the epoch, every rank's RNG
states and the epoch's running sums, so that the resumed run (sampler skip + per-item seeds, common.build_loader)
continues exactly. Only the checkpoint write itself
is done at a signal: a signal during a write or the k-NN monitor takes effect right after.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import itertools
import json
import os
import random
import signal
import sys
import threading
import time

import numpy as np
import torch
import torch.distributed as dist

import common

STOPPED_EXIT = 75  # EX_TEMPFAIL: stopped on request with a resumable checkpoint; rerun the same command
SAVE_MINUTES_CUDA = 30.0  # expected loss at a random preemption: 15 min (docs/scale.md)
SAVE_COST = 0.01  # a time-based save may cost at most this fraction of the run: interval >= write time / SAVE_COST


def rng_state(device: torch.device) -> dict:
    """This process's generator states (torch CPU and CUDA, random, numpy) in weights_only-loadable types."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "random": random.getstate(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}


def set_rng_state(state: dict, device: torch.device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["random"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def restore_position(seed: int, epoch: int, dist_info: common.DistInfo, position: dict, log=None) -> int:
    """Restore the RNG states of a mid-epoch checkpoint's `position`; returns the updates already done in the epoch.
    Resumed with another number of processes, the images of the rest of the epoch stay the same but the ranks' own
    draws (masks, picks) cannot: said in one line."""
    states = position["rng"]
    if len(states) == dist_info.world_size:
        set_rng_state(states[dist_info.rank], dist_info.device)
    else:
        common.seed_everything(common.epoch_seed(seed, epoch, dist_info.rank) + position["update"])
        if log is not None:
            log.print(f"warning: the checkpoint was written by {len(states)} process(es), this run has "
                      f"{dist_info.world_size}: the rest of epoch {epoch} trains on the same images, but its random "
                      f"masks/picks differ from an uninterrupted run")
    return position["update"]


class SkipSampler(torch.utils.data.Sampler):
    """`sampler` without its first `skip` indices: the rest of an epoch resumed after `skip` of this rank's samples
    (DistributedSampler hands rank r the positions r, r + W, ... of one permutation, so skipping k per rank leaves
    the same images for any number of processes W)."""

    def __init__(self, sampler, skip: int):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self):
        return max(len(self.sampler) - self.skip, 0)


def save_interval(save_minutes: float | None, device: torch.device) -> float:
    """Seconds between time-based saves; 0 = none. None: SAVE_MINUTES_CUDA on CUDA, none on the CPU."""
    if save_minutes is None:
        save_minutes = SAVE_MINUTES_CUDA if device.type == "cuda" else 0.0
    return 60.0 * save_minutes


class RunControl:
    """Stop signals and time-based saves, decided together by all ranks at update boundaries.

    SIGTERM, SIGUSR1 (SLURM's --signal) and a first SIGINT set a flag; at the next boundary every rank saves the
    resumable state, rank 0 prints "stopped by SIG... at epoch E step S; rerun the same command to resume" and
    the process exits with STOPPED_EXIT. A second SIGINT (more than a second after the first, which a terminal
    and torchrun both deliver) aborts at once. `interval` seconds after the last save (epoch-end saves count) the
    next boundary saves; the default interval is stretched to at least the last save's duration / SAVE_COST. The
    handlers are installed on construction (main thread) for the rest of the process."""

    def __init__(self, save_minutes: float | None, dist_info: common.DistInfo, log: common.Logger, clock=time.monotonic):
        self.interval, self.dist_info, self.log, self.clock = save_interval(save_minutes, dist_info.device), dist_info, log, clock
        self.stretch = save_minutes is None  # the default adapts to the write time; an explicit --save-minutes does not
        self.signum, self.first_sigint, self.last_save, self.write_s = 0, None, clock(), 0.0
        if threading.current_thread() is threading.main_thread():
            for sig in common.STOP_SIGNALS:
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT and time.monotonic() - self.first_sigint > 1.0:
            print(f"\n[rank {self.dist_info.rank}] aborted by a second SIGINT; the last checkpoint is what remains",
                  file=sys.stderr, flush=True)
            os._exit(130)
        if not self.signum:
            self.signum, self.first_sigint = signum, time.monotonic()
            if self.dist_info.is_main:  # the lock holder (common.run_main): a requeued run may wait for this one
                mark_stopping(self.log.output_dir)

    def _agree(self, due: bool) -> tuple[int, bool]:
        """(signal number seen by any rank, save due on rank 0): one all-reduce (max) over the ranks."""
        flags = torch.tensor([self.signum, int(due and self.dist_info.is_main)], dtype=torch.long)
        if self.dist_info.in_group and self.dist_info.world_size > 1:
            flags = flags.to(self.dist_info.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return int(flags[0]), bool(flags[1])

    def _due(self) -> bool:
        interval = max(self.interval, self.write_s / SAVE_COST) if self.stretch else self.interval
        return self.interval > 0 and self.clock() - self.last_save >= interval

    def position(self, update: int, sums: dict) -> dict | None:
        """What a checkpoint written after `update` updates of an epoch needs to continue it exactly: the update count,
        every rank's RNG states (gathered: a collective, call it on every rank) and the epoch's running `sums`
        (floats, for the epoch's logged means). None on ranks other than 0."""
        states = common.gather_per_rank(self.dist_info, rng_state(self.dist_info.device))
        return {"update": update, "rng": states, "sums": dict(sums)} if self.dist_info.is_main else None

    def at_update(self, update: int, steps_per_epoch: int) -> tuple[bool, bool]:
        """After update `update` (1-based) of an epoch, on every rank: (save now, stop after that save), the same on
        all ranks (one all-reduce: a stop signal on any rank, or rank 0's save timer). The epoch's last update is
        left to the epoch-end save and `epoch_done`."""
        if update >= steps_per_epoch:
            return False, False
        signum, due = self._agree(self._due())
        if signum:  # another rank's signal: this one stops too, and says which
            self.signum = signum
        return bool(signum or due), bool(signum)

    @contextlib.contextmanager
    def saving(self, epoch: int, update: int, steps_per_epoch: int):
        """Around a save inside an epoch: its duration (the timer stretches to it) and one line."""
        t0 = self.clock()
        yield
        self.last_save, self.write_s = self.clock(), self.clock() - t0
        self.log.print(f"saved {common.checkpoint_path(self.log.output_dir)} at epoch {epoch} step {update} of "
                       f"{steps_per_epoch} ({self.write_s:.1f} s)")

    def epoch_done(self, epochs_done: int):
        """After the epoch-end checkpoint (and the k-NN monitor): stop if any rank was signalled meanwhile."""
        self.last_save = self.clock()
        signum, _ = self._agree(False)
        if signum:
            self.signum = signum
            self.stop(f"after epoch {epochs_done - 1}")

    def stop(self, where: str):
        """Every rank, after the save: wait for rank 0's write, say so, exit with STOPPED_EXIT."""
        if self.dist_info.in_group and self.dist_info.world_size > 1:
            dist.barrier()  # no rank exits before rank 0's write is done: torchrun kills the others when one exits
        self.log.print(f"stopped by {signal.Signals(self.signum).name} {where}; rerun the same command to resume")
        self.log.close()
        raise SystemExit(STOPPED_EXIT)


LOCK_WAIT_SECONDS = 300  # how long a run waits for a predecessor that is stopping (a requeued job)


def mark_stopping(output_dir: str):
    """Mark OUTPUT_DIR/.lock, when this process holds it, as held by a run that is stopping (a run started meanwhile
    waits for it instead of refusing)."""
    with contextlib.suppress(OSError, ValueError), open(os.path.join(output_dir, ".lock"), "r+") as f:
        info = json.loads(f.read() or "{}")
        if info.get("pid") == os.getpid():
            info["state"] = "stopping"
            f.seek(0)
            f.truncate()
            f.write(json.dumps(info) + "\n")


class OutputLock:
    """OUTPUT_DIR/.lock, held (flock) by the one run that writes OUTPUT_DIR (taken by common.run_main before the run
    reads anything there): the kernel releases it when that process ends, however it ends, so a dead run leaves
    nothing that blocks. The file names the holder (pid, host, start, command, state) and is removed on release. A
    second run stops with one line naming the live one; if the live one is stopping (signalled, writing its last
    checkpoint: a requeued job started early), it waits for it."""

    def __init__(self, output_dir: str, wait: float = LOCK_WAIT_SECONDS):
        import fcntl
        import socket
        self.path = os.path.join(output_dir, ".lock")
        self.info = {"pid": os.getpid(), "host": socket.gethostname(), "started": f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}",
                     "command": " ".join(sys.argv)[:300], "state": "running"}
        deadline, said = time.monotonic() + wait, False
        while True:
            self.f = open(self.path, "a+")
            try:
                fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):  # no locks on this filesystem
                    print(f"warning: cannot lock {self.path} ({e.strerror}); make sure no other run writes {output_dir}",
                          flush=True)
                    break
                self.f.seek(0)
                try:
                    holder = json.loads(self.f.read() or "{}")
                except ValueError:
                    holder = {}
                self.f.close()
                who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}: "
                       f"{holder.get('command', '?')}")
                if holder.get("state") != "stopping" or time.monotonic() > deadline:
                    raise common.UserError(f"{output_dir} is in use by a live run ({who}); wait for it to end, stop it, or "
                                           f"pass another --output-dir") from None
                if not said:
                    print(f"waiting for the run that is stopping in {output_dir} ({who})", flush=True)
                    said = True
                time.sleep(1.0)
                continue
            if self._same_file():
                break
            self.f.close()  # locked a file its holder removed on release meanwhile: lock the one at the path
        self._write()

    def _same_file(self) -> bool:
        try:
            return os.path.samestat(os.fstat(self.f.fileno()), os.stat(self.path))
        except OSError:
            return False

    def _write(self):
        self.f.seek(0)
        self.f.truncate()
        self.f.write(json.dumps(self.info) + "\n")
        self.f.flush()

    def release(self):
        with contextlib.suppress(OSError, ValueError):
            if self._same_file():
                os.remove(self.path)  # before unlocking: a run waiting on this file then retries the path
            self.f.close()  # closing the file releases the lock
