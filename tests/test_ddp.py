"""Two-process data-parallel training on the CPU (gloo), as torchrun starts it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from wordlm.checkpoint import load_checkpoint

from conftest import tiny_config

HERE = Path(__file__).resolve().parent


def torchrun(*args, log_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           f"--log-dir={log_dir}", *map(str, args)]  # not a torchelastic_* folder in /tmp per test
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_two_process_gloo_training_agrees_and_writes_one_checkpoint(small_corpus, tmp_path):
    cfg = tiny_config(small_corpus, epochs=2, log_every=5)
    cfg.model.dropout = 0.1  # different masks per rank; the weights must still agree
    path = tmp_path / "tiny.toml"
    path.write_text(cfg.to_toml())
    out = tmp_path / "run"
    proc = torchrun(HERE / "ddp_worker.py", path, out, log_dir=tmp_path / "torchrun")
    assert proc.returncode == 0, proc.stderr[-3000:]
    check = json.loads((out / "ddp_check.json").read_text())
    assert check == {"world": 2, "same_weights": True, "steps": check["steps"], "tokens": check["tokens"]}
    # Each rank read half of the text as 4 streams: half the steps of one process, all the tokens counted.
    single = tiny_config(small_corpus, epochs=2)
    from wordlm.train import train

    one = train(single, tmp_path / "one")
    assert abs(check["steps"] - one.steps / 2) <= 1
    assert abs(check["tokens"] - one.tokens) <= 2 * 4 * 8
    # Only rank 0 wrote: one best/, one last/, one metrics file with one record per event.
    assert sorted(p.name for p in out.iterdir()) == [".lock", "best", "config.toml", "ddp_check.json", "last",
                                                      "metrics.jsonl"]
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs if r["event"] == "train"]
    assert steps == sorted(set(steps))
    weights = load_checkpoint(out, prefer="last").model_state
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_two_processes_start_a_budgeted_average_together(small_corpus, tmp_path):
    # train.average_after in a time budget: each rank's clock passes the fraction at its own step, so the ranks
    # agree on the step (at a log interval); one that started alone would validate another average.
    cfg = tiny_config(small_corpus, epochs=0, time_budget_s=3.0, log_every=2, eval_every=6, optimizer="ntasgd",
                      average_after=0.5, nonmono=1000, schedule="constant")
    path = tmp_path / "tiny.toml"
    path.write_text(cfg.to_toml())
    out = tmp_path / "run"
    proc = torchrun(HERE / "ddp_worker.py", path, out, log_dir=tmp_path / "torchrun")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "ddp_check.json").read_text())["same_weights"]
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    [switch] = [r for r in recs if r["event"] == "averaging"]
    assert switch["step"] % 2 == 0 and "average_after" in switch["trigger"]
    assert load_checkpoint(out, prefer="last", train_state=True).train_state["n_averaged"] > 0


def test_nproc_flag_wraps_torchrun(small_corpus, tmp_path):
    cfg = tiny_config(small_corpus, max_steps=6)
    path = tmp_path / "tiny.toml"
    path.write_text(cfg.to_toml())
    temp = tmp_path / "temp"  # the launcher's temp dir: it must be as empty after the run as before
    temp.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(temp)}
    proc = subprocess.run([sys.executable, "-m", "wordlm", "train", "--config", str(path), "--out",
                           str(tmp_path / "run"), "--nproc", "2"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("finished: 6 steps") == 1
    assert load_checkpoint(tmp_path / "run", prefer="last").meta["step"] == 6
    assert sorted(p.name for p in temp.iterdir()) == []  # no torchelastic_* log folder left behind


def test_bad_input_under_nproc_is_one_line_once(small_corpus, tmp_path):
    """Both ranks meet the same bad input (a corpus too short for the batch): the user sees its line once, the
    exit code of the failing rank (3, a data error), no torchrun traceback or banner, and no --out folder."""
    cfg = tiny_config(small_corpus, max_steps=6)
    short = tmp_path / "short.txt"
    short.write_text("too short\n")
    cfg.data.train = str(short)
    path = tmp_path / "tiny.toml"
    path.write_text(cfg.to_toml())
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # as a user's shell has it
    proc = subprocess.run([sys.executable, "-m", "wordlm", "train", "--config", str(path), "--out",
                           str(tmp_path / "new" / "run"), "--nproc", "2"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert [ln for ln in lines if ln.startswith("error:")] == [
        "error: data.train (the share of each of 2 processes): text of 1 token is too short for 4 streams (each "
        "needs at least 2 tokens); use a longer text or a smaller batch size (train.batch_size)"], proc.stderr
    assert len(lines) == 2 and lines[0].startswith("fitting the word tokenizer"), proc.stderr  # rank 0's alone
    assert not (tmp_path / "new").exists()


def test_two_process_training_resumes_exactly(small_corpus, tmp_path):
    # Stop a 2-process run at step 6, resume it to step 12, and compare with a run that went straight to 12:
    # each rank's own RNG (dropout masks) and LSTM state must come back, or the weights would differ.
    def config(steps: int) -> Path:
        cfg = tiny_config(small_corpus, max_steps=steps, schedule="constant", log_every=3)
        cfg.model.dropout = 0.2
        path = tmp_path / f"tiny-{steps}.toml"
        path.write_text(cfg.to_toml())
        return path

    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def wordlm(*args) -> None:
        proc = subprocess.run([sys.executable, "-m", "wordlm", "-q", "train", "--nproc", "2", *map(str, args)],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    wordlm("--config", config(12), "--out", tmp_path / "straight")
    wordlm("--config", config(6), "--out", tmp_path / "cut")
    wordlm("--config", config(12), "--out", tmp_path / "cut", "--resume")
    a = load_checkpoint(tmp_path / "straight", prefer="last")
    b = load_checkpoint(tmp_path / "cut", prefer="last")
    assert a.meta["step"] == b.meta["step"] == 12
    for name, w in a.model_state.items():
        assert torch.equal(w, b.model_state[name]), name
    losses = [[(r["step"], r["loss"]) for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text()
                                                    .splitlines()) if r["event"] == "train"]
              for run in ("straight", "cut")]
    assert losses[0] == losses[1]


def test_resuming_with_another_number_of_processes_says_it_will_not_match(small_corpus, tmp_path):
    # Each process reads its own share of the text, so the saved LSTM states and stream positions fit only the
    # same number of processes: going from 2 to 1 (or 1 to 2) trains on, with a warning, from zero states.
    cfg = tiny_config(small_corpus, max_steps=4, schedule="constant", log_every=2)
    path = tmp_path / "tiny.toml"
    path.write_text(cfg.to_toml())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def wordlm(*args) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "wordlm", "train", *map(str, args)],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    wordlm("--config", path, "--out", tmp_path / "run", "--nproc", "2")
    one = wordlm("--out", tmp_path / "run", "--resume", "--set", "train.max_steps=8")
    assert "resume: the run had 2 processes, now 1: each reads another share of the text" in one.stderr
    two = wordlm("--out", tmp_path / "run", "--resume", "--set", "train.max_steps=12", "--nproc", "2")
    assert two.stderr.count("resume: the run had 1 process, now 2: each reads another share") == 1  # rank 0's
    assert two.stderr.count("resume: train.max_steps is 12 in the config and 8 in the checkpoint") == 1
    assert load_checkpoint(tmp_path / "run", prefer="last").meta["step"] == 12


def test_nproc_is_checked_against_the_gpus_and_cores(monkeypatch):
    """More processes than GPUs is refused before any starts (each process takes a GPU of its own); more than the
    CPU cores is a warning."""
    from typer.testing import CliRunner

    import wordlm.cli
    from wordlm.cli import app

    launched = []
    monkeypatch.setattr(wordlm.cli, "_torchrun", lambda n: launched.append(n) or sys.exit(0))
    demo = str(Path(__file__).resolve().parent.parent / "configs" / "demo.toml")
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    r = CliRunner().invoke(app, ["train", "--config", demo, "--nproc", "3", "--set", "train.device=cpu"])
    assert r.exit_code == 0 and launched == [3]
    assert "warning: --nproc 3 is more processes than this machine's 2 CPU cores: they will take turns on them" \
        in r.output
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    r = CliRunner().invoke(app, ["train", "--config", demo, "--nproc", "2", "--set", "train.device=cuda"])
    assert r.exit_code == 2 and launched == [3]
    assert r.output.strip() == "error: --nproc 2 runs one process per GPU, but 1 GPU is visible: use --nproc 1 or fewer"


def test_a_process_that_fails_after_the_run_finished_does_not_fail_the_run(small_corpus, tmp_path):
    # A rank that aborts on its way out, after training and saving (C++'s "terminate called without an active
    # exception" once did, rarely), leaves a complete run: exit 0 with a warning. One that aborts before it has
    # finished fails the command with the signal's code (128 + 6).
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_config(small_corpus, max_steps=2, schedule="constant").to_toml())
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import atexit, os\n"
        "if os.environ.get('LOCAL_RANK') == '1':\n"
        "    if os.environ['ABORT_WHEN'] == 'at exit':\n"
        "        atexit.register(os.abort)\n"
        "    else:\n"
        "        os.abort()\n")

    def wordlm(when: str, out: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "ABORT_WHEN": when,
               "PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")])}
        return subprocess.run([sys.executable, "-m", "wordlm", "train", "--config", str(path), "--out",
                               str(tmp_path / out), "--nproc", "2"], capture_output=True, text=True, env=env,
                              timeout=300)

    late = wordlm("at exit", "late")
    assert late.returncode == 0, late.stderr[-3000:]
    assert "warning: a process failed as it exited (exit code 134)" in late.stderr
    assert load_checkpoint(tmp_path / "late", prefer="last").meta["step"] == 2
    early = wordlm("at start", "early")
    assert early.returncode == 134, early.stderr[-3000:]
    assert "the run is complete" not in early.stderr
