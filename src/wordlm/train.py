"""The training loop: truncated BPTT over parallel streams, SGD or AdamW, validation, checkpoints, metrics.

    train(config, out_dir) -> TrainResult

writes OUT/config.toml (the resolved config), OUT/metrics.jsonl (one JSON object per event), OUT/last/ (full
training state, for --resume) and OUT/best/ (the weights with the lowest validation loss). The loop itself
makes no host synchronisation per step: the host reads the device only at log intervals, at validation and at
checkpoints. Non-finite steps (train.skip_nonfinite) are skipped on the device, by handing the fused optimizer a
`found_inf` flag as a gradient scaler would, and counted there; the counts are read at those same points. (The
adaptive softmax, a PyTorch module, synchronises inside its forward.) Because the step's device work reads and
writes tensors only (`_Loop._device_step`), it can also be recorded once as a CUDA graph and replayed
(train.cuda_graphs).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import arch_differences, find_checkpoint, load_checkpoint, save_checkpoint
from .config import Config, TrainConfig
from .data import Streams, check_text_file, encode_file, iter_lines
from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    NonFiniteLossError,
    RunLockedError,
    TrainingInterrupted,
)
from .evaluate import autocast, bf16_refusal, bf16_supported, fp32_math, total_nll
from .graphs import CudaGraphs, NotRecordable, RecordedEvaluation
from .model import build_model, detach_state, num_parameters, resolve_device
from .tokenizer import Tokenizer, fit_tokenizer

log = logging.getLogger("wordlm")


class Schedule:
    """The learning rate as a function of step, epoch and validation history (state saved in checkpoints)."""

    def __init__(self, cfg: TrainConfig, total_steps: int):
        self.cfg, self.total_steps = cfg, max(total_steps, 1)
        self.lr = cfg.lr  # the current rate for plateau/step; the peak for cosine

    def at_step(self, step: int, elapsed_s: float = 0.0) -> float:
        """The rate for optimizer step `step` (0-based), `elapsed_s` seconds into training. With a time budget
        the cosine follows whichever limit is nearer: the steps or the seconds."""
        c = self.cfg
        if c.schedule != "cosine":
            return self.lr
        if step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        progress = min(1.0, (step - c.warmup_steps) / max(1, self.total_steps - c.warmup_steps))
        if c.time_budget_s:
            progress = max(progress, min(1.0, elapsed_s / c.time_budget_s))
        return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1 + math.cos(math.pi * progress))

    def start_epoch(self, epoch: int) -> None:
        """`epoch` is 1-based. The step schedule decays once per epoch from decay_start_epoch on."""
        c = self.cfg
        if c.schedule == "step":
            self.lr = c.lr * c.lr_decay ** max(0, epoch - c.decay_start_epoch + 1)

    def after_validation(self, improved: bool) -> None:
        if self.cfg.schedule == "plateau" and not improved:
            self.lr /= self.cfg.lr_decay  # the classic "divide by 4 when validation stops improving"

    def state_dict(self) -> dict:
        return {"lr": self.lr}

    def load_state_dict(self, state: dict) -> None:
        self.lr = float(state["lr"])


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    epochs_done: float
    tokens: int
    best_valid_loss: float
    best_valid_ppl: float
    elapsed_s: float
    stop_reason: str
    num_parameters: int
    model: torch.nn.Module = field(repr=False, default=None)  # the trained model, as it is after the last step
    peak_mem_mb: float = 0.0  # see peak_memory_mb


def peak_memory_mb(device: torch.device) -> float:
    """The most memory this process has held, in MiB: on a CUDA device what PyTorch's allocator has reserved
    there (the CUDA graphs' pool included: what must fit on the card), elsewhere the peak resident set of the
    process. Host-side counters only: reading them waits for nothing on the device."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 2**20
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


class RunLock:
    """An exclusive flock on OUT/.lock; the kernel drops it if the process dies, even by kill -9."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self.fd: int | None = None
        self.acquired = False  # whether this process held the lock (a failed run may then clean up after itself)

    def __enter__(self) -> RunLock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise RunLockedError(f"{self.path.parent} is in use by another training process; wait for it to "
                                 f"finish or use another --out directory") from None
        self.acquired = True
        os.ftruncate(self.fd, 0)
        os.write(self.fd, str(os.getpid()).encode())
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)


class _StopFlag:
    """Before `defer` is set (fitting the tokenizer, encoding the corpus: nothing written yet), SIGINT/SIGTERM
    stop at once, as KeyboardInterrupt. After it, they set a flag; the loop finishes its step, writes last/ and
    stops. A second signal kills. A signal the process was started to ignore stays ignored (a shell script's
    `wordlm train ... &` starts with SIGINT ignored, so that a Ctrl-C meant for the script leaves the run alone)."""

    def __init__(self):
        self.signum: int | None = None
        self.defer = False
        self._old: dict[int, object] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(s) is not signal.SIG_IGN:
                    self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if not self.defer:
            raise KeyboardInterrupt
        if self.signum is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


class Distributed:
    """Data-parallel training across processes started by torchrun (gloo on the CPU, NCCL on GPUs).

    Each rank reads its own contiguous 1/world of the training text as `batch_size` streams, gradients are
    averaged by DistributedDataParallel, every rank validates the same weights on the same text (so every rank
    takes the same schedule and patience decisions), and only rank 0 locks the run, logs and writes checkpoints.
    """

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.started = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """This rank's device: with several ranks on CUDA, the GPU of its local rank."""
        if self.world > 1 and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def start(self, device: torch.device) -> torch.device:
        if self.world == 1:
            return device
        import torch.distributed as dist

        device = self.device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.started = True
        return device

    def stop(self, wait_for_all: bool = False) -> None:
        """Close the process group we opened. After a successful run every rank first waits for the others
        (rank 0 is the one still writing), so no rank tears down its connections under a peer still using them.
        After an error there is no waiting: the other ranks may never arrive."""
        if self.started:
            import torch.distributed as dist

            if wait_for_all:
                dist.barrier()
            dist.destroy_process_group()

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t)
            t /= self.world
        return t

    def any(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor([int(flag)])
        dist.all_reduce(t)
        return bool(t.item())

    def gather(self, obj):
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def should_average(history: list[float], nonmono: int) -> bool:
    """NT-ASGD's trigger on the validation losses so far, the newest last: the newest is worse than the best
    of those before it, leaving out the `nonmono` just before it (a non-monotone criterion, so one bad
    evaluation does not switch). As the AWD-LSTM paper's Algorithm 1 and code: the first possible switch is
    at validation nonmono + 2."""
    before, newest = history[:-1], history[-1]
    return len(before) > nonmono and newest > min(before[:-nonmono])


RUN_CONFIG_HEADER = "# The config of this run, as wordlm train resolved it (--set overrides included).\n"


def _foreign_config(path: Path) -> bool:
    """Whether `path` is a config.toml that a run did not write (a run that failed before its first record leaves
    its own, which a new run may replace)."""
    if not path.is_file():  # nothing there, or `--out` under a file: the checks that follow say so
        return False
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            return f.readline() != RUN_CONFIG_HEADER
    except OSError:  # unreadable: not one a run wrote
        return True


def _has_run(out: Path) -> bool:
    names = ("last", "best", ".last.old", ".best.old", "metrics.jsonl")
    return any((out / n).exists() for n in names)


class _Metrics:
    def __init__(self, path: Path, keep_until_step: int | None, enabled: bool = True):
        self.path, self.f = path, None
        if not enabled:  # ranks other than 0 log nothing
            return
        if keep_until_step is not None and path.exists():
            # Resuming: drop records the killed run wrote after its last checkpoint; they will be logged again.
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and self._step(ln) <= keep_until_step]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(k + "\n" for k in kept))
            os.replace(tmp, path)
        self.f = open(path, "a", encoding="utf-8")

    @staticmethod
    def _step(line: str) -> int:
        try:
            return int(json.loads(line).get("step", 0))
        except ValueError:
            return 1 << 62

    def write(self, record: dict) -> None:
        if self.f is not None:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


def train(cfg: Config, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
          progress: bool = False, init_from: str | Path | None = None) -> TrainResult:
    """Train a model as `cfg` says into `out_dir`. See the module docstring for what is written.

    `init_from` (a run or checkpoint) starts from its weights and tokenizer with a fresh optimizer: finetuning.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory for the run")
    ckpt = None
    if resume:
        if not out.is_dir():
            raise CheckpointError(f"nothing to resume: {out} does not exist; start without --resume")
        try:
            last = find_checkpoint(out, prefer="last")
        except CheckpointError:
            raise CheckpointError(f"nothing to resume in {out}: it has no last/ checkpoint; "
                                  f"start without --resume") from None
        if last.name not in ("last", ".last.old"):  # best/ alone: weights, no optimizer or stream position
            raise CheckpointError(f"nothing to resume in {out}: last/ is missing or incomplete (no meta.json), and "
                                  f"best/ keeps weights only (no optimizer state or stream position); start over "
                                  f"with --overwrite or into another --out")
        ckpt = load_checkpoint(last, train_state=True)
        diffs = arch_differences(cfg, ckpt.config)
        if diffs:
            raise ConfigError([f"--resume with a changed architecture ({d}, config vs checkpoint); "
                               f"train into a new --out instead" for d in diffs])
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank reads the same config: one says it
            _warn_train_changes(cfg, ckpt.config)
    if init_from is not None and ckpt is None:
        init = load_checkpoint(init_from)
        source = init.path.resolve()
        if out.resolve() == source or out.resolve() in source.parents:
            raise ConfigError(f"--out {out} holds the checkpoint being finetuned ({init.path}); write the "
                              f"finetuned run to another --out")
        diffs = arch_differences(cfg, init.config)
        if diffs:
            raise ConfigError([f"finetuning needs the architecture of {init.path} ({d}, config vs checkpoint)"
                               for d in diffs])
        ckpt = init
        ckpt.train_state = None  # weights and tokenizer only: the optimizer and position start fresh
    if not resume and out.is_dir() and _has_run(out) and not overwrite:
        raise ConfigError(f"{out} already holds a run; continue it with --resume, start over with --overwrite, "
                          f"or choose another --out")
    if not resume and not overwrite and not _has_run(out) and _foreign_config(out / "config.toml"):
        # A folder of the user's own (`--out .`, or the folder that holds the config being trained): the run would
        # write its resolved config.toml over theirs, comments and all.
        raise ConfigError(f"{out} holds a config.toml that wordlm did not write, and training there would replace "
                          f"it: choose another --out (or add --overwrite to replace it)")

    for what in ("train", "valid"):  # fail fast, before any slow work, on files that are not there
        check_text_file(getattr(cfg.data, what), f"data.{what}")
    tc = cfg.train
    dist = Distributed()
    _Loop.check_graphs(tc, resolve_device(tc.device), dist.world)  # before --overwrite clears anything
    here = dist.device(resolve_device(tc.device))  # this rank's device (nothing is started on it yet)
    if tc.precision == "bf16" and not bf16_supported(here):
        raise ConfigError(f"train.precision is bf16, but {bf16_refusal(here)}: set train.precision = \"fp32\"")
    device = dist.start(resolve_device(tc.device))
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    elif dist.world > 1 and device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.world))  # share the cores, do not fight
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)

    # Only rank 0 writes to `out`, so only it creates the folder (and knows which folders it made, deepest first).
    made = [d for d in (out, *out.parents) if not d.exists()] if dist.main else []
    lock_is_new = not (out / ".lock").exists()
    try:
        if dist.main:
            out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create the run directory ({e.strerror}); choose another "
                          f"--out") from None
    finished, lock = False, RunLock(out) if dist.main else None
    try:
        with lock or contextlib.nullcontext(), _StopFlag() as stop, fp32_math(device, tc.tf32):
            result = _prepare_and_run(cfg, out, device, dist, ckpt, stop, overwrite, progress)
        finished = True
        return result
    finally:
        dist.stop(wait_for_all=finished)
        if not finished and lock is not None and lock.acquired:  # not another process's new folder and lock
            _remove_if_unused(out, made, lock_is_new)


def _remove_if_unused(out: Path, made: list[Path], lock_is_new: bool) -> None:
    """After a run that failed before writing anything (bad data, say), remove the lock file it created and the
    folders it created, so a mistyped command leaves nothing behind; a folder that holds anything else stays."""
    try:
        if lock_is_new and [p.name for p in out.iterdir()] == [".lock"]:
            (out / ".lock").unlink()
        for d in made:
            d.rmdir()
    except OSError:
        return


def _prepare_and_run(cfg: Config, out: Path, device: torch.device, dist: Distributed, ckpt, stop: _StopFlag,
                     overwrite: bool, progress: bool) -> TrainResult:
    tc = cfg.train
    # Everything that can fail on bad input happens before anything in `out` is replaced.
    if ckpt is not None:
        tokenizer = ckpt.tokenizer
    else:
        log.info("fitting the %s tokenizer on %s", cfg.tokenizer.kind, cfg.data.train)
        tokenizer = fit_tokenizer(cfg.tokenizer, lambda: iter_lines(cfg.data.train, "data.train"))
        short = cfg.tokenizer.kind == "sentencepiece" and tokenizer.vocab_size < cfg.tokenizer.vocab_size
        if short and dist.main:  # sentencepiece stops where the text has no more pieces to offer
            log.warning("warning: tokenizer.vocab_size is %d, but sentencepiece found only %d pieces in the "
                        "training text: the vocabulary has %d", cfg.tokenizer.vocab_size, tokenizer.vocab_size,
                        tokenizer.vocab_size)
    cache = cfg.data.cache_dir or None
    train_split = encode_file(cfg.data.train, tokenizer, cache, "data.train", progress)
    valid_split = encode_file(cfg.data.valid, tokenizer, cache, "data.valid", progress)
    began_on = (ckpt.train_state or {}).get("train_sha256") if ckpt is not None else None
    if began_on and began_on != train_split.sha256 and dist.main:
        log.warning("resume: %s is not the text this run was trained on (its SHA-256 has changed); training goes "
                    "on from the checkpoint's step and stream position in the new text, so it will not match an "
                    "uninterrupted run", cfg.data.train)
    ids = train_split.ids
    if dist.world > 1:  # this rank's contiguous share of the text
        n = (len(ids) - 1) // dist.world
        ids = ids[dist.rank * n: dist.rank * n + n + 1]
    share = f" (the share of each of {dist.world} processes)" if dist.world > 1 else ""
    train_streams = _streams(ids, tc.batch_size, device, "data.train" + share, "train.batch_size")
    valid_streams = _streams(valid_split.ids, tc.eval_batch_size, device, "data.valid",
                             "train.eval_batch_size")
    stop.defer = True  # from here on a signal ends the run with a checkpoint, after the step in progress
    if dist.main:
        if overwrite and (ckpt is None or ckpt.train_state is None):
            for name in ("last", "best", ".last.old", ".best.old", ".last.tmp", ".best.tmp"):
                shutil.rmtree(out / name, ignore_errors=True)
            (out / "metrics.jsonl").unlink(missing_ok=True)
        (out / "config.toml").write_text(RUN_CONFIG_HEADER + cfg.to_toml())
    return _Loop(cfg, out, device, dist, tokenizer, train_streams, valid_streams, ckpt, stop,
                 progress and dist.main, train_split.sha256).run()


def _streams(ids, batch_size, device, what, knob) -> Streams:
    try:
        return Streams(ids, batch_size, device)
    except DataError as e:  # too short for the batch: name the file and the knob to change
        raise DataError(f"{what}: {e} ({knob})") from None


def _warn_train_changes(new: Config, old: Config) -> None:
    a, b = new.to_dict(), old.to_dict()
    for section in ("data", "train"):
        for k, v in a[section].items():
            if b[section].get(k) != v:
                log.warning("resume: %s.%s is %r in the config and %r in the checkpoint; using the config's %r",
                            section, k, v, b[section].get(k), v)


@dataclass
class _Recorded:
    """train.cuda_graphs' bookkeeping: the recorded steps, one per window length, with their fixed input
    buffers, and counts for the log. A length is recorded the second time it comes (after `warmup_steps` eager
    steps in all): its first step runs eagerly, so whatever the kernels set up lazily for a shape is done
    before a recording. Variable BPTT draws lengths around seq_len: each common one gets a recording, and past
    `max_recordings` lengths the rest run eagerly."""
    backend: object
    warmup_steps: int = 3
    max_recordings: int = 64
    eager_steps: int = 0
    replays: int = 0
    seen: dict = field(default_factory=dict)  # window length -> eager steps taken at it
    steps: dict = field(default_factory=dict)  # window length -> (replay, x buffer, y buffer)


class _Loop:
    background_saves: bool | None = None  # None: in the background on accelerators, synchronous on the CPU
    graph_backend = CudaGraphs  # how train.cuda_graphs records a step (the tests put a CPU stand-in here)

    def __init__(self, cfg: Config, out: Path, device: torch.device, dist: Distributed, tokenizer: Tokenizer,
                 train_streams: Streams, valid_streams: Streams, ckpt, stop: _StopFlag, progress: bool,
                 train_sha256: str = ""):
        self.cfg, self.tc, self.out, self.device, self.dist = cfg, cfg.train, out, device, dist
        self.train_sha256 = train_sha256  # saved with the training state: a resume checks it is the same text
        self.tokenizer, self.train_streams, self.valid_streams = tokenizer, train_streams, valid_streams
        self.stop, self.progress = stop, progress
        tc = self.tc
        self.model = build_model(cfg.model, tokenizer.vocab_size, device)
        self.forward = self.model  # what the step calls: the model, or its DistributedDataParallel wrapper
        if dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.forward = DistributedDataParallel(self.model, device_ids=[device] if device.type == "cuda" else None)
            torch.manual_seed(tc.seed + dist.rank)  # same initial weights (broadcast), different dropout masks
        if tc.compile:
            self.forward = torch.compile(self.forward)
        self.graphs: _Recorded | None = None
        self.graphed_validation: RecordedEvaluation | None = None
        if tc.cuda_graphs:
            self.check_graphs(tc, device, dist.world)
            self.graphs = _Recorded(self.graph_backend())
            self.graphed_validation = RecordedEvaluation(self.graphs.backend)
        params = list(self.model.parameters())
        if tc.optimizer in ("sgd", "ntasgd"):
            self.opt = torch.optim.SGD(params, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay,
                                       fused=True)
        else:
            # fused: one kernel for the whole update instead of several per tensor (CPU and CUDA)
            self.opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=True)
        # The skip flag the fused optimizers read (as with a GradScaler): a step with found_inf != 0 changes no
        # weight, no momentum and no step count, and the host never has to look at the flag to make that happen.
        self.found_inf = torch.zeros((), device=device)
        if tc.skip_nonfinite:
            self.opt.found_inf = self.found_inf
        self.model.ar_alpha, self.model.tar_beta = tc.ar_alpha, tc.tar_beta
        # NT-ASGD (Merity et al. 2017): plain SGD until validation stops improving, then the running average of
        # the iterates is the model that is evaluated and saved. PyTorch's AveragedModel keeps the average.
        self.averaged: torch.optim.swa_utils.AveragedModel | None = None
        self.n_averaged = 0  # iterates in the average, counted on the host (see _update_average)
        self.valid_history: list[float] = []
        self.nonmono_stop = False  # set by each validation under train.stop_nonmono
        self.windows_per_epoch = train_streams.num_windows(tc.seq_len)
        by_epochs = tc.epochs * self.windows_per_epoch if tc.epochs else None
        self.total_steps = min((x for x in (by_epochs, tc.max_steps or None) if x is not None),
                               default=1 << 62)  # only a time budget
        self.schedule = Schedule(tc, self.total_steps)
        # Position and history; overwritten when resuming.
        self.step, self.epoch, self.row, self.tokens, self.elapsed = 0, 0, 0, 0, 0.0
        self.best, self.bad_evals, self.nonfinite_total, self.last_eval_step = math.inf, 0, 0, -1
        self.state = self.model.init_state(tc.batch_size)
        resuming = ckpt is not None and ckpt.train_state is not None
        self.finetuning = ckpt is not None and not resuming
        if resuming:
            self._restore(ckpt)
        elif self.finetuning:  # the weights only
            self.model.load_state_dict(ckpt.model_state)
        if tc.optimizer == "ntasgd" and tc.average_from_start and self.averaged is None:
            self._start_averaging()  # after the weights are loaded: the average starts from them
        self.metrics = _Metrics(out / "metrics.jsonl", self.step if resuming else None, dist.main)
        from concurrent.futures import ThreadPoolExecutor

        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wordlm-checkpoint")
        self._pending_saves: list = []

    # --- state ---------------------------------------------------------------------------------------------
    def _train_state(self) -> dict:
        return {
            "step": self.step, "epoch": self.epoch, "row": self.row, "tokens": self.tokens,
            "train_sha256": self.train_sha256,
            "elapsed_s": self.elapsed, "best_valid_loss": self.best, "bad_evals": self.bad_evals,
            "nonfinite_total": self.nonfinite_total, "last_eval_step": self.last_eval_step,
            "optimizer": _plain_lr(self.opt.state_dict()), "schedule": self.schedule.state_dict(),
            "valid_history": list(self.valid_history),
            # With NT-ASGD, model.pt holds the average; training continues from the raw iterate saved here.
            "raw_model": self.model.state_dict() if self.averaged is not None else None,
            "n_averaged": self.n_averaged,
            "lstm_h": self.state[0].detach().cpu(), "lstm_c": self.state[1].detach().cpu(),
            "rng_torch": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "rng_python": random.getstate(),
            # Every rank's own LSTM state and RNG, so a data-parallel run resumes exactly too.
            "ranks": self.dist.gather({"lstm_h": self.state[0].detach().cpu(), "lstm_c": self.state[1].detach().cpu(),
                                       "rng_torch": torch.get_rng_state()}) if self.dist.world > 1 else [],
        }

    def _restore(self, ckpt) -> None:
        ts = ckpt.train_state
        self.valid_history = list(ts.get("valid_history", []))
        if ts.get("raw_model") is not None:  # NT-ASGD had switched: model.pt is the average
            self.model.load_state_dict(ts["raw_model"])
            self._start_averaging()
            self.averaged.module.load_state_dict(ckpt.model_state)
            self.n_averaged = ts["n_averaged"]
            self.averaged.n_averaged.fill_(self.n_averaged)
        else:
            self.model.load_state_dict(ckpt.model_state)
        self.opt.load_state_dict(ts["optimizer"])
        self.schedule.load_state_dict(ts["schedule"])
        self.step, self.epoch, self.row, self.tokens = ts["step"], ts["epoch"], ts["row"], ts["tokens"]
        self.elapsed, self.best, self.bad_evals = ts["elapsed_s"], ts["best_valid_loss"], ts["bad_evals"]
        self.nonfinite_total, self.last_eval_step = ts["nonfinite_total"], ts["last_eval_step"]
        h, c = ts["lstm_h"], ts["lstm_c"]
        own = ts.get("ranks") or []  # each rank's LSTM state and RNG, saved by a run of several processes
        began_with = max(1, len(own))
        if began_with != self.dist.world:  # each process reads another share of the text: the states do not fit
            if self.dist.main:
                log.warning("resume: the run had %d process%s, now %d: each reads another share of the text, so the "
                            "LSTM states and RNG restart and the run will not match an uninterrupted one",
                            began_with, "es" * (began_with != 1), self.dist.world)
            h = c = None
        elif self.dist.world > 1:
            h, c = own[self.dist.rank]["lstm_h"], own[self.dist.rank]["lstm_c"]
            ts = {**ts, "rng_torch": own[self.dist.rank]["rng_torch"]}
        if h is not None and h.shape[1] != self.tc.batch_size:
            log.warning("resume: train.batch_size changed (%d -> %d); the carried LSTM state starts from zero",
                        h.shape[1], self.tc.batch_size)
        elif h is not None:
            self.state = (h.to(self.device), c.to(self.device))
        if began_with != self.dist.world and self.dist.world > 1:
            torch.manual_seed(self.tc.seed + self.step + self.dist.rank)  # dropout masks must differ between ranks
        else:
            torch.set_rng_state(ts["rng_torch"])
        if ts["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ts["rng_cuda"])
        random.setstate(ts["rng_python"])
        log.info("resuming %s at step %d (epoch %d)", self.out, self.step, self.epoch + 1)

    def _save(self, name: str, valid_loss: float | None = None) -> None:
        """Write checkpoint `name`. On a GPU the write happens in the background: the weights and training state
        are copied to host memory here (a copy torch.save would make anyway; it is the only wait), then written,
        hashed and renamed into place by a writer thread while the GPU trains on, in order, at most two behind.
        On the CPU the save is synchronous: a snapshot would cost a second copy of the weights and optimizer
        state in memory, and the write is short next to CPU training."""
        full = name == "last"
        train_state = self._train_state() if full else None  # a collective under DDP: every rank takes part
        if not self.dist.main:
            return
        info = {"step": self.step, "epoch": self.epoch, "tokens": self.tokens,
                "valid_loss": valid_loss if valid_loss is not None else self.best,
                "num_parameters": num_parameters(self.model)}
        kw = dict(config=self.cfg, tokenizer=self.tokenizer, info=info)
        background = self.background_saves if self.background_saves is not None else self.device.type != "cpu"
        if not background:
            self._wait_for_saves()
            save_checkpoint(self.out / name, model_state=self.eval_model.state_dict(), train_state=train_state, **kw)
            return
        self._pending_saves.append(self._writer.submit(
            save_checkpoint, self.out / name, model_state=_host_copy(self.eval_model.state_dict()),
            train_state=_host_copy(train_state), **kw))
        self._wait_for_saves(keep=2)  # bounded host memory: at most two copies waiting for the disk

    def _wait_for_saves(self, keep: int = 0) -> None:
        """Block until at most `keep` background saves are unfinished; re-raise a failed save's error here."""
        while self._pending_saves and (len(self._pending_saves) > keep or self._pending_saves[0].done()):
            self._pending_saves.pop(0).result()

    @classmethod
    def check_graphs(cls, tc: TrainConfig, device: torch.device, world: int) -> None:
        """Refuse train.cuda_graphs where it cannot run (what the config alone cannot tell)."""
        if not tc.cuda_graphs:
            return
        if not cls.graph_backend.supports(device):
            raise ConfigError(f"train.cuda_graphs needs a CUDA device, and this run is on {device}: set "
                              f"train.cuda_graphs = false")
        if world > 1:
            raise ConfigError("train.cuda_graphs runs in one process: drop --nproc or set train.cuda_graphs = false")

    # --- the loop ------------------------------------------------------------------------------------------
    def _start_averaging(self) -> None:
        # AveragedModel deep-copies the module it is given. Mid-run the live model holds the last forward's
        # tensors (the AR/TAR term), which cannot be deep-copied, so it is given a fresh model with the weights.
        # Its initialisation draws on a forked RNG: the dropout masks that follow, and so the raw iterates, are
        # the same whenever averaging starts (runs that differ only in their start compare iterate for iterate).
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            fresh = build_model(self.cfg.model, self.tokenizer.vocab_size, self.device)
        fresh.load_state_dict(self.model.state_dict())
        self.averaged = torch.optim.swa_utils.AveragedModel(fresh, use_buffers=True)
        self.n_averaged = 0
        self._avg_pairs = ([t.detach() for t in (*self.averaged.module.parameters(), *self.averaged.module.buffers())],
                           [t.detach() for t in (*self.model.parameters(), *self.model.buffers())])
        log.info("NT-ASGD: averaging the weights from step %d on", self.step)

    @property
    def eval_model(self):
        """The weights that are evaluated and saved: the running average once NT-ASGD has switched."""
        return self.averaged.module if self.averaged is not None else self.model

    def validate(self) -> tuple[float, bool]:
        started = self.elapsed
        if self.graphed_validation is not None:
            try:
                nll, n = self.graphed_validation.total_nll(self.eval_model, self.valid_streams, self.tc.seq_len,
                                                           self.tc.precision, before_recording=self._wait_for_saves)
            except NotRecordable as e:
                raise ConfigError(f"train.cuda_graphs: validation's forward pass could not be recorded as a CUDA "
                                  f"graph ({e}); set train.cuda_graphs = false") from None
        else:
            nll, n = total_nll(self.eval_model, self.valid_streams, self.tc.seq_len, self.tc.precision)
        self._tick()  # the result is known now (total_nll read it to the host): time to a target counts to here
        loss = nll / n
        known = self.elapsed
        raw = {}
        if self.averaged is not None:  # what the average buys: the trained weights themselves, read the same way
            raw_nll, raw_n = total_nll(self.model, self.valid_streams, self.tc.seq_len, self.tc.precision)
            raw = {"raw_valid_ppl": _ppl(raw_nll / raw_n)}
            self._tick()
        nonmono = should_average(self.valid_history + [loss], self.tc.nonmono)  # AWD-LSTM's non-monotone test
        switch = self.tc.optimizer == "ntasgd" and self.averaged is None and nonmono
        self.nonmono_stop = self.tc.stop_nonmono and nonmono
        self.valid_history.append(loss)
        improved = loss < self.best
        if improved:
            self.best, self.bad_evals = loss, 0
        else:
            self.bad_evals += 1
        self.schedule.after_validation(improved)
        self.last_eval_step = self.step
        self.metrics.write({"event": "valid", "step": self.step, "epoch": self._epoch_float(),
                            "tokens": self.tokens, "valid_loss": loss, "valid_ppl": _ppl(loss),
                            **raw, "best_valid_ppl": _ppl(self.best), "lr": self._lr(self.step, started),
                            "elapsed_s": round(known, 3), "valid_s": round(known - started, 4)})
        if improved:
            self._save("best", loss)
        if switch:
            self._start_averaging()
            self.metrics.write({"event": "averaging", "step": self.step, "epoch": self._epoch_float(),
                                "trigger": f"validation (train.nonmono = {self.tc.nonmono})"})
        self._save("last", loss)
        return loss, improved

    def _validate_start(self) -> None:
        """Finetuning starts from a trained model, whose validation loss is the one to beat (AWD-LSTM's
        finetune.py): best/ never holds weights worse than those finetuning began with. The figure is not part
        of the history train.nonmono reads, as there. (Eager, also under train.cuda_graphs: one pass.)"""
        started = self.elapsed
        nll, n = total_nll(self.eval_model, self.valid_streams, self.tc.seq_len, self.tc.precision)
        self._tick()
        self.best = nll / n
        self.metrics.write({"event": "valid", "step": 0, "epoch": 0.0, "tokens": 0, "valid_loss": self.best,
                            "valid_ppl": _ppl(self.best), "best_valid_ppl": _ppl(self.best), "start": True,
                            "lr": self._lr(0, started), "elapsed_s": round(self.elapsed, 3),
                            "valid_s": round(self.elapsed - started, 4)})
        self._save("best", self.best)

    def _run_fraction(self) -> float:
        """How much of the run has passed: of its steps, or of its time budget, whichever is further on."""
        done = self.step / self.total_steps if self.total_steps < 1 << 62 else 0.0
        if self.tc.time_budget_s:
            done = max(done, self.elapsed / self.tc.time_budget_s)
        return done

    def _epoch_float(self) -> float:
        return round(self.epoch + self.row / max(1, self.train_streams.rows - 1), 4)

    def run(self) -> TrainResult:
        tc, model = self.tc, self.model
        from tqdm import tqdm

        bar = tqdm(total=self.total_steps if self.total_steps < 1 << 62 else None, initial=self.step,
                   disable=not self.progress, unit="step", dynamic_ncols=True, desc="train")
        log.info("model: %s parameters, vocabulary %d, %d window%s per epoch, device %s",
                 f"{num_parameters(model):,}", self.tokenizer.vocab_size, self.windows_per_epoch,
                 "s" * (self.windows_per_epoch != 1), self.device)
        if self.cfg.model.proj_size and self.device.type == "cpu":
            log.info("model.proj_size: oneDNN has no LSTM kernel with projections, so the CPU runs PyTorch's "
                     "generic one")
        model.train()
        self.params = list(model.parameters())
        self.run_loss = torch.zeros((), device=self.device)  # summed training loss since the last train record
        # On the device: [skipped steps since the last read, current streak of skipped steps, longest streak since
        # the last read], read (one sync) at log intervals, before checkpoints and at validation. The step updates
        # them through views made once here, so it dispatches no indexing operations.
        self.nf = torch.zeros(3, device=self.device)
        self._nf_skipped, self._nf_streak, self._nf_longest = self.nf.unbind()
        self._zero = torch.zeros((), device=self.device)  # torch.where's "else": a Python 0.0 costs an operation
        self.nonfinite_run = 0
        self.steps_since_record = self.skipped_since_record = 0
        t_log, tokens_log = time.perf_counter(), self.tokens
        self.paused_s = 0.0  # validation and checkpoint time since the last train record: not training throughput
        self._t_mark = time.perf_counter()
        if self.finetuning and self.step == 0:
            self._validate_start()
            self.paused_s += time.perf_counter() - t_log
        stop_reason = "finished"
        if self.row == 0:
            self.schedule.start_epoch(self.epoch + 1)
        self._shuffle_streams()  # the epoch's rotation, drawn again on a resume from its epoch number
        if self.graphs is not None:  # the graph reads the state from fixed buffers, refilled in place
            self.state = tuple(s.detach().clone() for s in self.state)
            self.lr_t = torch.zeros((), device=self.device)  # float32: what the fused CUDA kernels read
            for g in self.opt.param_groups:
                g["lr"] = self.lr_t
        try:
            while self.step < self.total_steps:
                if self.row >= self.train_streams.rows - 1:  # epoch boundary
                    self.epoch += 1
                    self.row = 0
                    self._shuffle_streams()
                    self._set_state(model.init_state(tc.batch_size))
                    if tc.eval_every == 0 and (why := self._validate_then_stop()):
                        stop_reason = why
                        break
                    self.schedule.start_epoch(self.epoch + 1)
                if tc.time_budget_s:
                    self._tick()
                    out_of_time = self.elapsed >= tc.time_budget_s
                    if self.dist.world > 1:  # every rank must stop at the same step
                        out_of_time = self.step % tc.log_every == 0 and self.dist.any(out_of_time)
                    if out_of_time:
                        stop_reason = f"time budget: {tc.time_budget_s:g} s"
                        break
                lr = self._lr(self.step, self.elapsed)
                seq_len = tc.seq_len
                if tc.variable_bptt:  # AWD-LSTM: lengths vary so windows do not always start at the same tokens
                    base = tc.seq_len if random.random() < 0.95 else tc.seq_len / 2
                    seq_len = max(5, int(random.gauss(base, 5)))
                    lr = lr * seq_len / tc.seq_len  # a short window's update counts less
                self._set_lr(lr)
                x, y = self.train_streams.window(self.row, seq_len)
                self._step(x, y)
                self.step += 1
                self.row += x.shape[0]
                self.tokens += x.numel() * self.dist.world
                self.steps_since_record += 1
                self._average_step()
                bar.update(1)
                if self.step % tc.log_every == 0:
                    good = self._read_nonfinite()  # the log-interval host sync
                    if good:
                        now = time.perf_counter()
                        train_loss = self.dist.mean(self.run_loss).item() / good
                        tok_s = (self.tokens - tokens_log) / max(now - t_log - self.paused_s, 1e-9)
                        self._tick()
                        self.metrics.write({"event": "train", "step": self.step, "epoch": self._epoch_float(),
                                            "tokens": self.tokens, "loss": train_loss, "ppl": _ppl(train_loss),
                                            "lr": lr, "tokens_per_s": round(tok_s, 1),
                                            "elapsed_s": round(self.elapsed, 3),
                                            "peak_mem_mb": round(peak_memory_mb(self.device), 1)})
                        bar.set_postfix(loss=f"{train_loss:.3f}", ppl=f"{_ppl(train_loss):.1f}", lr=f"{lr:.3g}",
                                        tok_s=f"{tok_s:,.0f}")
                        self.run_loss.zero_()
                        self.steps_since_record = self.skipped_since_record = 0
                        t_log, tokens_log, self.paused_s = now, self.tokens, 0.0
                if tc.eval_every and self.step % tc.eval_every == 0:
                    if why := self._validate_then_stop():
                        stop_reason = why
                        break
                elif tc.save_every and self.step % tc.save_every == 0:
                    self._read_nonfinite()
                    if self.nonfinite_run == 0:  # never save in the middle of a streak of skipped steps
                        paused = time.perf_counter()
                        self._save("last")
                        self.paused_s += time.perf_counter() - paused
                stopping = self.stop.signum is not None
                if self.dist.world > 1 and self.step % tc.log_every == 0:
                    stopping = self.dist.any(stopping)  # all ranks stop at the same step
                elif self.dist.world > 1:
                    stopping = False
                if stopping:
                    self._tick()
                    self._read_nonfinite()
                    self._save("last")
                    name = signal.Signals(self.stop.signum or signal.SIGTERM).name
                    raise TrainingInterrupted(f"stopped by {name} at step {self.step}; {self.out / 'last'} saved; "
                                              f"continue with: wordlm train --out {self.out} --resume")
            self._tick()
            if self.last_eval_step != self.step:
                self._read_nonfinite()
                self.validate()
        finally:
            bar.close()
            self.metrics.close()
            try:
                self._wait_for_saves()  # every checkpoint is on disk before train() returns or raises
            finally:
                self._writer.shutdown()
        if self.graphs is not None:
            g = self.graphs
            v = self.graphed_validation
            log.info("cuda_graphs: %d of %d steps replayed, %d window length(s) recorded; validation: %d "
                     "window(s) replayed, %d length(s) recorded", g.replays, g.replays + g.eager_steps, len(g.steps),
                     v.replays, v.recordings)
        return TrainResult(self.out, self.step, self._epoch_float(), self.tokens, self.best, _ppl(self.best),
                           self.elapsed, stop_reason, num_parameters(model), model, peak_memory_mb(self.device))

    def _shuffle_streams(self) -> None:
        """train.partial_shuffle: each stream starts this epoch at its own random token. The offsets come from
        the seed, the epoch and the rank alone, on a generator of their own: a resumed run draws the same ones,
        and the other random streams (dropout masks, window lengths) are left as they were."""
        if self.tc.partial_shuffle:
            rng = np.random.default_rng([self.tc.seed, self.epoch, self.dist.rank])
            self.train_streams.rotate(rng.integers(0, self.train_streams.rows, self.tc.batch_size))

    def _average_step(self) -> None:
        """After each optimizer step: start the NT-ASGD average once train.average_after of the run has passed
        (the budget's trigger; the validation trigger is in `validate`), and add the step's weights to it."""
        tc = self.tc
        if self.averaged is None and tc.average_after:
            due = self._run_fraction() >= tc.average_after
            if self.dist.world > 1:  # each rank's clock differs: all start at the same step, or their
                due = self.step % tc.log_every == 0 and self.dist.any(due)  # validations would differ
            if due:
                self._start_averaging()  # this step's weights are the first in the mean
                self.metrics.write({"event": "averaging", "step": self.step, "epoch": self._epoch_float(),
                                    "trigger": f"train.average_after = {tc.average_after:g}"})
        if self.averaged is not None:
            self._update_average()  # a skipped step leaves the weights as they were

    def _update_average(self) -> None:
        """Add the current weights to the NT-ASGD running mean: avg += (w - avg) / (n + 1), the update
        AveragedModel.update_parameters makes, but with n counted on the host: update_parameters reads its
        device-side count three times per call, a host sync every step on a GPU."""
        avg, cur = self._avg_pairs
        if self.n_averaged == 0:
            torch._foreach_copy_(avg, cur)
        else:
            torch._foreach_lerp_(avg, cur, 1.0 / (self.n_averaged + 1))
        self.n_averaged += 1
        self.averaged.n_averaged.add_(1)  # kept in step for anyone reading the AveragedModel itself

    # --- one step's device work ------------------------------------------------------------------------
    def _lr(self, step: int, elapsed_s: float) -> float:
        """The rate for `step` before variable BPTT scales it: the schedule's, or train.average_lr once NT-ASGD
        averages (a resumed run that had switched averages from its first step, so it keeps the rate)."""
        if self.tc.average_lr and self.averaged is not None:
            return self.tc.average_lr
        return self.schedule.at_step(step, elapsed_s)

    def _set_lr(self, lr: float) -> None:
        if self.graphs is not None:
            self.lr_t.fill_(lr)  # a tensor the recorded optimizer step reads
        else:
            for g in self.opt.param_groups:
                g["lr"] = lr

    def _set_state(self, state) -> None:
        if self.graphs is not None:
            for dst, src in zip(self.state, state, strict=True):
                dst.copy_(src.detach())
        else:
            self.state = state

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Train on one window: eagerly, or by replaying the step recorded for its length (train.cuda_graphs),
        whose fixed input buffers take the window first. The first few steps (the warm-up a CUDA graph needs) and
        the first step at each window length run eagerly."""
        g = self.graphs
        if g is None:
            self.state = self._device_step(x, y, detach_state(self.state))
            return
        n = x.shape[0]
        recorded = g.steps.get(n)
        if (recorded is None and g.eager_steps >= g.warmup_steps and g.seen.get(n, 0) > 0
                and len(g.steps) < g.max_recordings):
            recorded = self._record(x, y)
        if recorded is not None:
            replay, gx, gy = recorded
            gx.copy_(x)
            gy.copy_(y)
            replay()
            g.replays += 1
            return
        with g.backend.eager():
            self._set_state(self._device_step(x, y, self.state))
        g.eager_steps += 1
        g.seen[n] = g.seen.get(n, 0) + 1

    def _record(self, x: torch.Tensor, y: torch.Tensor):
        """Record the step for windows of x's length; returns (replay, x buffer, y buffer). Recording runs
        nothing: the caller replays it for this window."""
        g = self.graphs
        gx, gy = x.clone(), y.clone()
        self._wait_for_saves()  # no other thread near the device while the step is recorded
        for group in self.opt.param_groups:
            if "capturable" in group:  # AdamW refuses to be recorded without it (fused, it changes nothing)
                group["capturable"] = True
        try:
            replay = g.backend.capture(lambda: self._set_state(self._device_step(gx, gy, self.state)))
        except RuntimeError as e:  # an operation that cannot be recorded (a host sync, a data-dependent shape)
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"train.cuda_graphs: the training step could not be recorded as a CUDA graph "
                              f"({reason}); set train.cuda_graphs = false") from None
        finally:
            for group in self.opt.param_groups:
                if "capturable" in group:
                    group["capturable"] = False  # or every eager step warns
        g.steps[x.shape[0]] = (replay, gx, gy)
        log.log(logging.INFO if len(g.steps) == 1 else logging.DEBUG,
                "cuda_graphs: training step recorded at step %d (windows of %d)", self.step + 1, x.shape[0])
        return g.steps[x.shape[0]]

    def _device_step(self, x: torch.Tensor, y: torch.Tensor, state):
        """Forward, backward, clipping and the optimizer step, with the loss added to run_loss and the skip
        counters updated, all on the device: tensors in, tensors out, no host read, so that it can be recorded
        once as a CUDA graph. Returns the next LSTM state."""
        tc = self.tc
        # Gradients start from None: the backward then writes them rather than adding to them. When the step is
        # recorded, this is what makes every replay's backward write fresh gradients into the same buffers.
        self.opt.zero_grad(set_to_none=True)
        with autocast(self.device, tc.precision, cache=self.graphs is None):
            loss, state = self.forward(x, state, y, mean=True)
        reg = self.model.reg_loss
        (loss + reg if reg is not None else loss).backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, tc.clip if tc.clip > 0 else math.inf)
        loss = loss.detach()
        if not tc.skip_nonfinite:
            self.opt.step()
            self.run_loss += loss
            return detach_state(state)
        ok = torch.isfinite(loss + gnorm)
        bad = torch.logical_not(ok, out=self.found_inf)  # 1.0 makes the fused optimizer skip the whole update
        self.opt.step()
        self.run_loss += torch.where(ok, loss, self._zero)
        self._nf_skipped += bad
        self._nf_streak.add_(1).mul_(bad)  # +1 on a skipped step, back to 0 on a good one
        torch.maximum(self._nf_longest, self._nf_streak, out=self._nf_longest)
        return tuple(torch.where(ok, s.detach(), self._zero) for s in state)  # the state may hold the NaN too

    def _read_nonfinite(self) -> int:
        """Read the device-side step counters (one host sync), log skipped steps, and stop on a long streak.
        Returns the number of good steps since the last train record (the log step resets that count)."""
        skipped, streak, longest = (int(v) for v in self.nf.tolist())
        self.nf[0], self.nf[2] = 0, streak
        self.nonfinite_run = streak
        self.skipped_since_record += skipped
        if skipped:
            self.nonfinite_total += skipped
            self.metrics.write({"event": "nonfinite", "step": self.step, "epoch": self._epoch_float(),
                                "skipped": skipped, "in_a_row": streak, "skipped_total": self.nonfinite_total})
            log.warning("%d non-finite step(s) skipped by step %d (%d in a row now)", skipped, self.step, streak)
        if longest >= self.tc.max_nonfinite:
            raise NonFiniteLossError(
                f"{longest} non-finite steps in a row by step {self.step}: training stopped; the last good "
                f"checkpoint in {self.out} is kept. Lower train.lr or train.clip")
        return self.steps_since_record - self.skipped_since_record

    def _tick(self) -> None:
        """Add the wall time since the last tick to `elapsed` (kept across resumes)."""
        now = time.perf_counter()
        self.elapsed += now - self._t_mark
        self._t_mark = now

    def _validate_then_stop(self) -> str | None:
        """Validate (and checkpoint); why training should stop here (train.patience or train.stop_nonmono), or
        None."""
        self._tick()
        self._read_nonfinite()  # a host sync: the steps before it are done, so what follows is validation's time
        paused = time.perf_counter()
        self.validate()
        self.paused_s += time.perf_counter() - paused
        if self.tc.patience and self.bad_evals >= self.tc.patience:
            return f"early stop: {self.bad_evals} validations without improvement (train.patience)"
        if self.nonmono_stop:
            return (f"early stop: validation worse than the best before the last {self.tc.nonmono} "
                    f"(train.stop_nonmono)")
        return None


def _plain_lr(opt_state: dict) -> dict:
    """An optimizer state_dict with a tensor learning rate (train.cuda_graphs) written as a number."""
    for group in opt_state["param_groups"]:
        if torch.is_tensor(group["lr"]):
            group["lr"] = float(group["lr"])
    return opt_state


def _host_copy(obj):
    """A copy of a (nested) state dict whose tensors live in host memory and share nothing with training.
    Tensors that are views of the same memory (tied weights) stay shared, so they are saved once.

    GPU tensors are copied into pinned host memory without waiting for each (pinned memory takes the copy at
    full bus speed; PyTorch caches it, so the next save reuses it), then the stream is waited for once: the
    copies are complete when this returns, and the training steps queued after them cannot change them."""
    seen: dict = {}
    on_gpu = []

    def copy(o):
        if isinstance(o, torch.Tensor):
            key = (o.untyped_storage().data_ptr(), o.storage_offset(), tuple(o.shape), o.stride(), o.dtype, o.device)
            if key not in seen:
                if o.is_cuda:
                    seen[key] = torch.empty(o.shape, dtype=o.dtype, pin_memory=True).copy_(o.detach(),
                                                                                        non_blocking=True)
                    on_gpu.append(o.device)
                else:
                    seen[key] = o.detach().to("cpu", copy=True)
            return seen[key]
        if isinstance(o, dict):
            return {k: copy(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return type(o)(copy(v) for v in o)
        return o

    out = copy(obj)
    for device in set(on_gpu):
        torch.cuda.current_stream(device).synchronize()
    return out


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 700.0))

