"""Crashes, kills, corrupt or malicious checkpoints, and NaNs: nothing good is ever lost."""

import json
import logging
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from wordlm.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from wordlm.errors import CheckpointError, ConfigError, NonFiniteLossError, RunLockedError
from wordlm.model import LSTMLanguageModel
from wordlm.train import RunLock, train

from conftest import tiny_config

TIMING = ("tokens_per_s", "elapsed_s", "peak_mem_mb")  # measured, not replayed by a resume


def train_records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in r.items() if k not in TIMING} for r in map(json.loads, lines) if r["event"] == "train"]


def config_file(tmp_path: Path, corpus: dict, **train) -> Path:
    cfg = tiny_config(corpus, **train)
    cfg.model.dropout = 0.2  # draws random numbers, so the RNG state must survive the kill too
    path = tmp_path / "tiny.toml"
    path.write_text(cfg.to_toml())
    return path


def wordlm(*args, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "wordlm", "-q", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def wait_for_step(metrics: Path, step: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if metrics.exists():
            lines = metrics.read_text().splitlines()
            if lines and json.loads(lines[-1] or "{}").get("step", 0) >= step:
                return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    raise AssertionError(f"training did not reach step {step}")


def test_kill_9_then_resume_matches_an_uninterrupted_run(small_corpus, tmp_path):
    cfg = config_file(tmp_path, small_corpus, epochs=4, save_every=4, optimizer="adamw", lr=0.01,
                      schedule="cosine", warmup_steps=5, eval_every=10)
    straight = wordlm("train", "--config", cfg, "--out", tmp_path / "straight")
    assert straight.wait() == 0, straight.communicate()

    kill_at = random.Random().randint(6, 40)  # a random step, usually between checkpoints
    cut = tmp_path / "cut"
    proc = wordlm("train", "--config", cfg, "--out", cut)
    wait_for_step(cut / "metrics.jsonl", kill_at, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_from = load_checkpoint(cut, prefer="last").meta["step"]
    assert 0 < resumed_from < 48
    again = wordlm("train", "--out", cut, "--resume")
    assert again.wait() == 0, again.communicate()

    a = load_checkpoint(tmp_path / "straight", prefer="last").model_state
    b = load_checkpoint(cut, prefer="last").model_state
    assert all(torch.equal(a[k], b[k]) for k in a), f"weights differ after kill at {kill_at}"
    after = [r for r in train_records(cut) if r["step"] > resumed_from]
    assert after and after == [r for r in train_records(tmp_path / "straight") if r["step"] > resumed_from]
    assert train_records(cut) == train_records(tmp_path / "straight")  # nothing logged twice or lost


SAVER = """
import sys, torch
from wordlm.checkpoint import save_checkpoint
from wordlm.config import Config
from wordlm.tokenizer import WordTokenizer
cfg = Config()
tok = WordTokenizer.fit(["a b c"])
state = {"w": torch.zeros(1_500_000)}
for i in range(1_000_000):
    state["w"].fill_(i)
    save_checkpoint(sys.argv[1], model_state=state, config=cfg, tokenizer=tok, train_state={"step": i},
                    info={"step": i})
    print(i, flush=True)
"""


def test_killing_during_checkpoint_writes_always_leaves_a_loadable_last(tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    rng = random.Random()
    seen = -1
    for _ in range(8):
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "run" / "last")],
                                stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # at least one save done
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        d = find_checkpoint(tmp_path / "run", prefer="last")
        ck = torch.load(d / "model.pt", weights_only=True)
        step = json.loads((d / "meta.json").read_text())["step"]
        assert float(ck["w"][0]) == step  # the files of one checkpoint belong together
        assert json.loads((d / "meta.json").read_text())["files"]  # checksums present
        seen = max(seen, step)
    assert seen > 0


def test_old_copy_is_used_when_the_crash_came_between_the_renames(small_corpus, tmp_path):
    train(tiny_config(small_corpus, max_steps=3), tmp_path / "run")
    (tmp_path / "run" / "last").rename(tmp_path / "run" / ".last.old")
    assert find_checkpoint(tmp_path / "run", prefer="last").name == ".last.old"
    train(tiny_config(small_corpus, max_steps=6), tmp_path / "run", resume=True)
    assert load_checkpoint(tmp_path / "run", prefer="last").meta["step"] == 6
    assert not (tmp_path / "run" / ".last.old").exists()


def test_a_damaged_best_falls_back_to_last_with_a_warning(small_corpus, tmp_path, caplog):
    # wordlm swaps whole checkpoints in, so a best/ without meta.json is damage (a copy cut short, a hand edit):
    # evaluation goes on with last/, and says so rather than quietly reading other weights.
    train(tiny_config(small_corpus, max_steps=3), tmp_path / "run")
    caplog.clear()  # training's own lines
    logger = logging.getLogger("wordlm")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level("WARNING", logger="wordlm"):
            assert find_checkpoint(tmp_path / "run").name == "best"
            assert not caplog.records
            (tmp_path / "run" / "best" / "meta.json").unlink()
            assert find_checkpoint(tmp_path / "run").name == "last"
        assert {r.getMessage() for r in caplog.records} == {
            f"warning: {tmp_path / 'run' / 'best'} is incomplete (no meta.json); using {tmp_path / 'run' / 'last'}"}
        caplog.clear()
        shutil.rmtree(tmp_path / "run" / "best")  # no best/ at all (a run stopped before its first validation)
        with caplog.at_level("WARNING", logger="wordlm"):
            assert find_checkpoint(tmp_path / "run").name == "last"
        assert not caplog.records
    finally:
        logger.removeHandler(caplog.handler)


def test_a_checkpoint_replaced_while_it_is_read_is_read_again_whole(small_corpus, tmp_path, monkeypatch):
    # `wordlm eval RUN` while RUN trains: training may swap a new best/ in between reading meta.json and
    # model.pt. The reader must come back with one copy (the new one, whole), not the old meta.json with the new
    # weights (which it used to, silently), and not a "missing" or "corrupt" error.
    import wordlm.checkpoint as ckpt_module

    train(tiny_config(small_corpus, max_steps=3), tmp_path / "run")
    old = load_checkpoint(tmp_path / "run")
    new_state = {k: v + 1.0 if v.is_floating_point() else v for k, v in old.model_state.items()}
    real = ckpt_module._load_tensors
    swaps = []

    def swap_then_load(f):
        if not swaps:  # training writes the next best/ just as the reader gets to the weights
            swaps.append(save_checkpoint(tmp_path / "run" / "best", model_state=new_state, config=old.config,
                                         tokenizer=old.tokenizer, info={"step": 999}))
        return real(f)

    monkeypatch.setattr(ckpt_module, "_load_tensors", swap_then_load)
    got = load_checkpoint(tmp_path / "run")
    assert swaps and got.meta["step"] == 999
    assert all(torch.equal(got.model_state[k], new_state[k]) for k in new_state)

    def vanish_then_load(f):  # the read meets the swap's gap: best/ renamed away, its files gone
        if len(swaps) == 1:
            swaps.append(save_checkpoint(tmp_path / "run" / "best", model_state=old.model_state,
                                         config=old.config, tokenizer=old.tokenizer, info={"step": 1000}))
            raise FileNotFoundError(2, "No such file or directory", str(f))
        return real(f)

    monkeypatch.setattr(ckpt_module, "_load_tensors", vanish_then_load)
    got = load_checkpoint(tmp_path / "run")
    assert got.meta["step"] == 1000 and all(torch.equal(got.model_state[k], old.model_state[k])
                                            for k in old.model_state)


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))  # unpickling would create this file


def test_a_crafted_pickle_checkpoint_is_refused_and_never_runs(small_corpus, tmp_path):
    train(tiny_config(small_corpus, max_steps=2), tmp_path / "run")
    ck = tmp_path / "run" / "best"
    marker = tmp_path / "pwned"
    with open(ck / "model.pt", "wb") as f:
        pickle.dump({"embedding.weight": _Payload(str(marker))}, f, protocol=2)
    meta = json.loads((ck / "meta.json").read_text())
    meta["files"].pop("model.pt")  # as a crafted checkpoint would: no checksum to trip over first
    (ck / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="refusing to load .*model.pt: it holds pickled Python objects"):
        load_checkpoint(ck)
    assert not marker.exists()


def test_a_torch_saved_module_is_refused(tmp_path):
    from wordlm.config import ModelConfig

    d = tmp_path / "ck"
    d.mkdir()
    torch.save(LSTMLanguageModel(10, ModelConfig(embedding_size=4, hidden_size=4)), d / "model.pt")
    from wordlm.checkpoint import _load_tensors

    with pytest.raises(CheckpointError, match="pickled Python objects"):
        _load_tensors(d / "model.pt")


def test_corrupt_and_truncated_checkpoints_name_the_file(small_corpus, tmp_path):
    train(tiny_config(small_corpus, max_steps=2), tmp_path / "run")
    model = tmp_path / "run" / "best" / "model.pt"
    model.write_bytes(model.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"model.pt does not match its checksum in meta.json"):
        load_checkpoint(tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"model.pt is corrupt or truncated"):
        load_checkpoint(tmp_path / "run", verify=False)
    (tmp_path / "run" / "last" / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"last/meta.json is corrupt"):
        load_checkpoint(tmp_path / "run" / "last")


def test_format_version_and_tokenizer_mismatch(small_corpus, tmp_path):
    train(tiny_config(small_corpus, max_steps=2), tmp_path / "run")
    ck = tmp_path / "run" / "best"
    meta = json.loads((ck / "meta.json").read_text())
    (ck / "meta.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointError, match="has checkpoint format 99, this wordlm reads format 1"):
        load_checkpoint(ck)
    # A consistent-looking checkpoint whose tokenizer belongs to another model.
    from wordlm.data import file_sha256

    tok = json.loads((ck / "tokenizer.json").read_text())
    tok["itos"] = tok["itos"] + ["extra"]
    (ck / "tokenizer.json").write_text(json.dumps(tok))
    meta["files"]["tokenizer.json"] = file_sha256(ck / "tokenizer.json")
    (ck / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="embedding rows but the tokenizer has 19 types"):
        load_checkpoint(ck)


def test_resume_with_a_changed_architecture_is_refused(small_corpus, tmp_path):
    train(tiny_config(small_corpus, max_steps=2), tmp_path / "run")
    cfg = tiny_config(small_corpus, max_steps=4)
    cfg.model.hidden_size = 16
    with pytest.raises(ConfigError, match=r"--resume with a changed architecture \(model.hidden_size: 16 vs 8"):
        train(cfg, tmp_path / "run", resume=True)


def test_a_locked_run_directory_is_refused(small_corpus, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with RunLock(run):
        with pytest.raises(RunLockedError, match="in use by another training process"):
            train(tiny_config(small_corpus, max_steps=2), run)
    train(tiny_config(small_corpus, max_steps=2), run)  # free again once released


def test_a_run_that_fails_before_writing_removes_the_folders_it_made(small_corpus, tmp_path):
    """Bad data found after --out was made (here: too short for the batch) leaves no empty run folder behind,
    nor the parents it made, nor a lock file in a folder that was there before; that folder stays, with what it
    held."""
    from wordlm.errors import DataError

    short = tmp_path / "short.txt"
    short.write_text("too short\n")
    cfg = tiny_config(small_corpus, max_steps=2)
    cfg.data.train = str(short)
    with pytest.raises(DataError, match="too short"):
        train(cfg, tmp_path / "new" / "deeper" / "run")
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="too short"):
        train(cfg, kept / "run")
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(DataError, match="too short"):
        train(cfg, existing)
    assert existing.is_dir() and list(existing.iterdir()) == []  # as empty as it was: no lock file left in it
    ran = tmp_path / "ran"
    train(tiny_config(small_corpus, max_steps=2), ran)
    with pytest.raises(DataError, match="too short"):
        train(cfg, ran, overwrite=True)
    assert (ran / ".lock").is_file() and (ran / "best").is_dir()  # a run's own lock file stays with it


def test_a_run_refused_by_the_lock_leaves_the_other_runs_folder_and_lock_alone(small_corpus, tmp_path, monkeypatch):
    """Two runs started at once on a new --out: the one that loses the lock must not clean up the folder and lock
    file the winner has just made (it would have seen neither before it began)."""
    import wordlm.train

    holder = {}

    class ArrivesSecond(RunLock):
        def __enter__(self):
            holder["other"] = RunLock(self.path.parent).__enter__()  # the other process takes it first
            return super().__enter__()

    monkeypatch.setattr(wordlm.train, "RunLock", ArrivesSecond)
    run = tmp_path / "new" / "run"
    try:
        with pytest.raises(RunLockedError):
            train(tiny_config(small_corpus, max_steps=2), run)
        assert (run / ".lock").is_file()
    finally:
        holder["other"].__exit__(None, None, None)


def _nan_at(monkeypatch, steps: set[int]):
    """Make the model's loss NaN on the given (1-based) training calls."""
    original = LSTMLanguageModel.forward
    calls = {"n": 0}

    def forward(self, ids, state=None, targets=None, mean=False):
        loss, state = original(self, ids, state, targets, mean)
        if self.training and targets is not None:
            calls["n"] += 1
            if calls["n"] in steps:
                loss = loss * float("nan")
        return loss, state

    monkeypatch.setattr(LSTMLanguageModel, "forward", forward)


def test_a_nan_loss_is_skipped_and_counted(small_corpus, tmp_path, monkeypatch):
    _nan_at(monkeypatch, {5, 9})
    train(tiny_config(small_corpus, max_steps=12), tmp_path / "run")
    recs = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in recs if r["event"] == "nonfinite"]
    assert [(r["step"], r["skipped_total"]) for r in skipped] == [(5, 1), (9, 2)]
    assert all(torch.isfinite(v).all() for v in load_checkpoint(tmp_path / "run").model_state.values())
    assert {r["step"] for r in recs if r["event"] == "train"} == set(range(1, 13)) - {5, 9}


def test_a_skipped_step_changes_no_weight_and_no_optimizer_state(small_corpus, tmp_path, monkeypatch):
    # The skip happens on the device (the fused optimizer's found_inf), so check it really is a no-op.
    kw = dict(optimizer="adamw", lr=0.01, schedule="constant", log_every=100)
    two = train(tiny_config(small_corpus, max_steps=2, **kw), tmp_path / "two")
    _nan_at(monkeypatch, {3})
    three = train(tiny_config(small_corpus, max_steps=3, **kw), tmp_path / "three")
    for (name, a), b in zip(two.model.state_dict().items(), three.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    opt = load_checkpoint(tmp_path / "three", prefer="last", train_state=True).train_state["optimizer"]
    assert {float(s["step"]) for s in opt["state"].values()} == {2.0}  # AdamW's step count did not advance


def test_repeated_nans_stop_cleanly_keeping_the_last_good_checkpoint(small_corpus, tmp_path, monkeypatch):
    _nan_at(monkeypatch, set(range(11, 100)))
    with pytest.raises(NonFiniteLossError, match="5 non-finite steps in a row by step 15: training stopped"):
        train(tiny_config(small_corpus, max_steps=40, save_every=4, max_nonfinite=5), tmp_path / "run")
    last = load_checkpoint(tmp_path / "run", prefer="last", train_state=True)
    assert last.meta["step"] == 8  # the last save before the NaNs began
    assert all(torch.isfinite(v).all() for v in last.model_state.values())


def test_save_is_atomic_even_when_the_target_exists(tmp_path):
    from wordlm.config import Config
    from wordlm.tokenizer import WordTokenizer

    tok = WordTokenizer.fit(["a"])
    for i in range(3):
        save_checkpoint(tmp_path / "last", model_state={"embedding.weight": torch.zeros(3, 2)}, config=Config(),
                        tokenizer=tok, info={"step": i})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert load_checkpoint(tmp_path / "last").meta["step"] == 2


@pytest.mark.parametrize("background", [False, True], ids=["synchronous", "writer-thread"])
def test_a_full_disk_during_a_save_stops_with_one_line_and_keeps_the_last_good_checkpoint(small_corpus, tmp_path,
                                                                                          monkeypatch, background):
    """The fifth checkpoint write meets a full disk the way torch.save meets one (half a file, then torch's
    RuntimeError): the CLI says so in one line and exits 4, the half-written copy is gone, and the checkpoint
    before it still loads. Both ways of saving: on the CPU's, and in the writer thread a GPU run uses."""
    from typer.testing import CliRunner

    import wordlm.checkpoint as ckpt_mod
    from wordlm.cli import app
    from wordlm.train import _Loop

    monkeypatch.setattr(_Loop, "background_saves", background)

    writes, write_files = {"n": 0}, ckpt_mod._write_files

    def disk_fills_up(tmp, *args):
        writes["n"] += 1
        if writes["n"] < 5:
            return write_files(tmp, *args)
        tmp.mkdir()
        (tmp / "model.pt").write_bytes(b"PK\x03\x04 half a zip")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(ckpt_mod, "_write_files", disk_fills_up)
    cfg = tmp_path / "c.toml"
    cfg.write_text(tiny_config(small_corpus, max_steps=40, save_every=4).to_toml())
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--config", str(cfg), "--out", str(out)])
    assert result.exit_code == 4, result.output
    assert "Traceback" not in result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot write the checkpoint {out}/"), result.output
    assert "MiB free there" in errors[0] and "continue with --resume" in errors[0]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".lock") == []
    last = load_checkpoint(out, prefer="last", train_state=True)
    assert 0 < last.meta["step"] < 40
    monkeypatch.setattr(ckpt_mod, "_write_files", write_files)  # the disk has room again: --resume finishes
    result = CliRunner().invoke(app, ["train", "--out", str(out), "--resume"])
    assert result.exit_code == 0, result.output
    assert load_checkpoint(out, prefer="last").meta["step"] == 40
