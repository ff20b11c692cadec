import json
import math
import random
import re
import shutil

import pytest
import torch

from wordlm.checkpoint import load_checkpoint
from wordlm.config import Config, TrainConfig
from wordlm.errors import ConfigError
from wordlm.train import RUN_CONFIG_HEADER, Schedule, train

from conftest import needs_cpu_bf16, tiny_config, train_until_sigint, write_lines

TIMING = ("tokens_per_s", "elapsed_s", "peak_mem_mb")  # measured, not replayed by a resume


def records(run, event="train"):
    """The run's metrics.jsonl records of one event, without the wall-clock fields."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in r.items() if k not in TIMING} for r in map(json.loads, lines) if r["event"] == event]


# Measured with torch 2.13.0 on the CPU (tiny_config, seed 7; the same on repeated runs) and pinned: a change in
# initialisation, data layout, loss or update rule moves them.
GOLDEN_FIRST_LOSSES = [2.89117, 2.84030, 2.84497, 2.79310, 2.82089]  # the first is ln(18): 18 types


def test_golden_first_five_losses(small_corpus, tmp_path):
    train(tiny_config(small_corpus, max_steps=5), tmp_path / "run")
    losses = [r["loss"] for r in records(tmp_path / "run")]
    assert losses == pytest.approx(GOLDEN_FIRST_LOSSES, abs=2e-4)


def test_run_directory_contents(small_corpus, tmp_path):
    result = train(tiny_config(small_corpus, epochs=2), tmp_path / "run")
    run = tmp_path / "run"
    assert (run / "config.toml").is_file() and (run / "best" / "model.pt").is_file()
    assert (run / "last" / "train_state.pt").is_file() and not (run / "best" / "train_state.pt").exists()
    valid = records(run, "valid")
    assert [r["epoch"] for r in valid] == [1.0, 2.0]
    train_rec = records(run)[-1]
    for key in ("step", "epoch", "tokens", "loss", "ppl", "lr"):
        assert key in train_rec
    last_line = json.loads((run / "metrics.jsonl").read_text().splitlines()[-2])
    assert last_line["tokens_per_s"] > 0 and last_line["elapsed_s"] > 0
    # the process's peak resident set on the CPU: torch alone holds well over 50 MiB; a peak never falls (the
    # records round it to 0.1 MiB)
    mems = [json.loads(ln)["peak_mem_mb"] for ln in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in ln]
    assert mems[0] > 50 and mems == sorted(mems) and result.peak_mem_mb >= mems[-1] - 0.05
    assert result.best_valid_loss == min(r["valid_loss"] for r in valid)
    assert load_checkpoint(run).meta["valid_loss"] == pytest.approx(result.best_valid_loss)


def test_training_lowers_validation_loss(small_corpus, tmp_path):
    train(tiny_config(small_corpus, epochs=6, optimizer="adamw", lr=0.02), tmp_path / "run")
    valid = [r["valid_loss"] for r in records(tmp_path / "run", "valid")]
    assert valid[-1] < valid[0] - 0.3


def test_refuses_to_overwrite_a_run_without_being_asked(small_corpus, tmp_path):
    cfg = tiny_config(small_corpus, max_steps=3)
    train(cfg, tmp_path / "run")
    before = (tmp_path / "run" / "best" / "model.pt").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run; continue it with --resume"):
        train(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "best" / "model.pt").read_bytes() == before
    train(cfg, tmp_path / "run", overwrite=True)


def test_a_config_toml_of_the_users_own_in_out_is_not_replaced_without_being_asked(small_corpus, tmp_path):
    # `--out .`, or the folder that holds the config being trained: the run would write its config.toml over it.
    own = tmp_path / "mine"
    own.mkdir()
    text = "# my notes on this experiment\n[train]\nlr = 1.0\n"
    (own / "config.toml").write_text(text)
    cfg = tiny_config(small_corpus, max_steps=2)
    with pytest.raises(ConfigError, match="holds a config.toml that wordlm did not write"):
        train(cfg, own)
    assert (own / "config.toml").read_text() == text
    assert sorted(p.name for p in own.iterdir()) == ["config.toml"]  # no lock file, no run begun
    train(cfg, own, overwrite=True)  # asked: replaced
    assert (own / "config.toml").read_text().startswith(RUN_CONFIG_HEADER)


def test_a_config_toml_left_by_a_run_that_wrote_nothing_else_may_be_replaced(small_corpus, tmp_path):
    cfg = tiny_config(small_corpus, max_steps=2)
    train(cfg, tmp_path / "run")
    for name in ("best", "last"):  # as if it had died before its first record
        shutil.rmtree(tmp_path / "run" / name)
    (tmp_path / "run" / "metrics.jsonl").unlink()
    train(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "best").is_dir()


def test_patience_stops_after_that_many_validations_without_improvement(small_corpus, tmp_path, monkeypatch):
    import itertools

    import wordlm.train as train_module

    scripted = itertools.chain([3.0, 2.5, 2.6, 2.4, 2.45, 2.5], itertools.repeat(2.0))  # the 4th improves
    monkeypatch.setattr(train_module, "total_nll", lambda *a, **k: (next(scripted) * 100, 100))
    result = train(tiny_config(small_corpus, patience=2, eval_every=3, max_steps=30, epochs=0), tmp_path / "run")
    assert result.steps == 18  # the 5th and 6th validations did not improve on 2.4
    assert result.stop_reason == "early stop: 2 validations without improvement (train.patience)"
    assert load_checkpoint(tmp_path / "run").meta["valid_loss"] == pytest.approx(2.4)


def test_schedules():
    step = Schedule(TrainConfig(schedule="step", lr=1.0, lr_decay=0.5, decay_start_epoch=5), 100)
    lrs = []
    for epoch in range(1, 8):
        step.start_epoch(epoch)
        lrs.append(step.at_step(0))
    assert lrs == [1, 1, 1, 1, 0.5, 0.25, 0.125]  # Zaremba et al.: halve after epoch 4
    plateau = Schedule(TrainConfig(schedule="plateau", lr=20.0, lr_decay=4.0), 100)
    plateau.after_validation(improved=True)
    plateau.after_validation(improved=False)
    assert plateau.at_step(0) == 5.0
    cos = Schedule(TrainConfig(schedule="cosine", lr=1.0, warmup_steps=10, min_lr=0.1), 110)
    assert cos.at_step(0) == pytest.approx(0.1) and cos.at_step(9) == pytest.approx(1.0)
    assert cos.at_step(60) == pytest.approx(0.55) and cos.at_step(110) == pytest.approx(0.1)


def test_a_train_record_averages_its_own_steps_across_a_validation(small_corpus, tmp_path):
    # With a learning rate this small the loss hardly moves, so every train record must show about the same loss;
    # a record whose average counted the steps since a validation, not since the last record, would not.
    train(tiny_config(small_corpus, max_steps=40, lr=1e-6, log_every=8, eval_every=5), tmp_path / "run")
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if r["event"] == "train"]
    assert len(losses) == 5 and max(losses) - min(losses) < 0.05, losses


@pytest.mark.parametrize("background", [False, True], ids=["sync-saves", "background-saves"])
def test_tied_weights_are_saved_once(small_corpus, tmp_path, monkeypatch, background):
    from wordlm.train import _Loop

    monkeypatch.setattr(_Loop, "background_saves", background)
    cfg = tiny_config(small_corpus, max_steps=2)
    cfg.model.tie_weights, cfg.model.hidden_size, cfg.model.embedding_size = True, 64, 64
    train(cfg, tmp_path / "tied")
    cfg.model.tie_weights = False
    train(cfg, tmp_path / "untied")
    tied = load_checkpoint(tmp_path / "tied")
    assert tied.model_state["embedding.weight"].data_ptr() == tied.model_state["decoder.weight"].data_ptr()
    size = {n: (tmp_path / n / "best" / "model.pt").stat().st_size for n in ("tied", "untied")}
    vocab_matrix = 4 * 64 * tied.model_state["embedding.weight"].shape[0]
    assert size["untied"] - size["tied"] >= 0.9 * vocab_matrix


def test_a_time_budget_anneals_over_the_seconds_and_stops_training(small_corpus, tmp_path):
    cos = Schedule(TrainConfig(schedule="cosine", lr=1.0, min_lr=0.0, time_budget_s=100, epochs=0), 1 << 62)
    assert cos.at_step(5, elapsed_s=0) == pytest.approx(1.0)
    assert cos.at_step(5, elapsed_s=50) == pytest.approx(0.5) and cos.at_step(5, elapsed_s=100) == pytest.approx(0)
    bounded = Schedule(TrainConfig(schedule="cosine", lr=1.0, time_budget_s=100), 10)
    assert bounded.at_step(10, elapsed_s=1) == pytest.approx(0)  # the steps ran out first
    result = train(tiny_config(small_corpus, epochs=0, time_budget_s=1.5, schedule="cosine"), tmp_path / "run")
    assert result.stop_reason == "time budget: 1.5 s"
    assert 1.5 <= result.elapsed_s < 10 and result.epochs_done > 1  # several epochs of the tiny corpus
    assert (tmp_path / "run" / "best" / "meta.json").is_file()


def test_ctrl_c_while_the_corpus_is_read_stops_at_once_and_writes_nothing(small_corpus, tmp_path, monkeypatch):
    """A Ctrl-C before training begins (fitting the tokenizer, encoding a large corpus) is not held until the
    first step: it stops at once, --overwrite has not cleared the run yet, and a new --out is not left behind."""
    import signal

    import wordlm.train

    cfg = tiny_config(small_corpus, max_steps=3)
    train(cfg, tmp_path / "run")
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file() and p.name != ".lock"}
    encode, calls = wordlm.train.encode_file, []

    def encode_then_sigint(*args, **kwargs):
        calls.append(1)
        if len(calls) in (1, 3):  # one Ctrl-C in each of the two runs below (a second would kill pytest)
            signal.raise_signal(signal.SIGINT)
        return encode(*args, **kwargs)

    monkeypatch.setattr(wordlm.train, "encode_file", encode_then_sigint)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "run", overwrite=True)
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file() and p.name != ".lock"} == before
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "new" / "run")
    assert not (tmp_path / "new").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler was put back


def test_a_run_started_with_sigint_ignored_keeps_ignoring_it(small_corpus, tmp_path, monkeypatch):
    """`wordlm train ... &` in a shell script starts with SIGINT ignored, so that a Ctrl-C meant for the script
    leaves it running; training must not put a handler of its own in place of that."""
    import signal

    import wordlm.train

    encode = wordlm.train.encode_file

    def encode_then_sigint(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        return encode(*args, **kwargs)

    monkeypatch.setattr(wordlm.train, "encode_file", encode_then_sigint)
    inherited = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        result = train(tiny_config(small_corpus, max_steps=3), tmp_path / "run")
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert result.stop_reason == "finished" and (tmp_path / "run" / "last" / "meta.json").is_file()


@pytest.mark.parametrize("background", [False, True], ids=["sync-saves", "background-saves"])
def test_ctrl_c_then_resume_matches_an_uninterrupted_run(small_corpus, tmp_path, monkeypatch, background):
    from wordlm.train import _Loop

    monkeypatch.setattr(_Loop, "background_saves", background)  # the GPU's way of saving, run on the CPU
    cfg = tiny_config(small_corpus, epochs=3, eval_every=7, optimizer="adamw", lr=0.01,
                      schedule="cosine", warmup_steps=3)
    cfg.model.dropout = 0.3  # dropout draws random numbers: the RNG state must be restored too
    train(cfg, tmp_path / "straight")

    stopped = train_until_sigint(monkeypatch, cfg, tmp_path / "cut", 17)  # mid epoch 1 (75 windows an epoch)
    assert re.search(r"stopped by SIGINT at step 17.*--resume", stopped), stopped
    assert load_checkpoint(tmp_path / "cut", prefer="last").meta["step"] == 17
    train(cfg, tmp_path / "cut", resume=True)

    a = load_checkpoint(tmp_path / "straight", prefer="last").model_state
    b = load_checkpoint(tmp_path / "cut", prefer="last").model_state
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert records(tmp_path / "cut") == records(tmp_path / "straight")  # every logged loss, same values
    assert [r["valid_loss"] for r in records(tmp_path / "cut", "valid")] == \
        [r["valid_loss"] for r in records(tmp_path / "straight", "valid")]


def _epoch_starts(monkeypatch, cfg, out):
    """Train `cfg` into `out` and return the first input window of each epoch."""
    from wordlm.data import Streams

    firsts, window = [], Streams.window

    def spy(self, row, seq_len):
        x, y = window(self, row, seq_len)
        if self.batch_size == cfg.train.batch_size and row == 0:
            firsts.append(x.clone())
        return x, y

    monkeypatch.setattr(Streams, "window", spy)
    try:
        train(cfg, out)
    finally:
        monkeypatch.setattr(Streams, "window", window)
    return firsts


def test_partial_shuffle_starts_each_epoch_elsewhere_and_resumes_exactly(small_corpus, tmp_path, monkeypatch):
    plain = _epoch_starts(monkeypatch, tiny_config(small_corpus, epochs=3), tmp_path / "plain")
    assert len(plain) == 3 and all(torch.equal(x, plain[0]) for x in plain)  # off: every epoch reads alike
    cfg = tiny_config(small_corpus, epochs=3, eval_every=7, partial_shuffle=True)
    cfg.model.dropout = 0.3
    shuffled = _epoch_starts(monkeypatch, cfg, tmp_path / "straight")
    assert len(shuffled) == 3  # and each epoch starts anew:
    assert not any(torch.equal(a, b) for a, b in zip(shuffled, shuffled[1:] + plain[:1], strict=True))
    again = _epoch_starts(monkeypatch, cfg, tmp_path / "again")
    assert all(torch.equal(a, b) for a, b in zip(again, shuffled, strict=True))  # the seed decides the offsets

    stopped = train_until_sigint(monkeypatch, cfg, tmp_path / "cut", 100)  # mid epoch 2 (75 windows an epoch)
    assert "stopped by SIGINT at step 100" in stopped
    train(cfg, tmp_path / "cut", resume=True)  # epoch 2's offsets drawn again from the seed and the epoch
    a = load_checkpoint(tmp_path / "straight", prefer="last").model_state
    b = load_checkpoint(tmp_path / "cut", prefer="last").model_state
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert records(tmp_path / "cut") == records(tmp_path / "straight")


def markov_text(P, n_tokens, rng):
    """Sample a chain whose state 0 is the line end; words are s1..sK."""
    k, state, lines, words = len(P), 0, [], []
    for _ in range(n_tokens):
        state = rng.choices(range(k), P[state])[0]
        if state == 0:
            lines.append(" ".join(words))
            words = []
        else:
            words.append(f"s{state}")
    return lines


def true_perplexity(P):
    """exp of the entropy rate: sum_i pi_i H(P_i), with pi the stationary distribution."""
    T = torch.tensor(P, dtype=torch.float64)
    pi = torch.full((len(P),), 1.0 / len(P), dtype=torch.float64)
    for _ in range(10000):
        pi = pi @ T
    rows = -(T * torch.where(T > 0, T.log(), torch.zeros_like(T))).sum(1)
    return math.exp(float(pi @ rows))


def test_learns_a_markov_chain_to_its_true_perplexity(tmp_path):
    rng = random.Random(3)
    k = 7
    P = []
    for _ in range(k):  # sparse rows: a few likely successors, so the chain has structure to learn
        w = [rng.random() ** 3 for _ in range(k)]
        P.append([x / sum(w) for x in w])
    paths = {name: str(write_lines(tmp_path / f"{name}.txt", markov_text(P, n, rng)))
             for name, n in (("train", 60000), ("valid", 8000), ("test", 20000))}
    cfg = Config.from_dict({
        "data": paths,
        "model": {"embedding_size": 16, "hidden_size": 32, "num_layers": 1},
        "train": {"optimizer": "adamw", "lr": 0.01, "epochs": 3, "batch_size": 32, "seq_len": 20,
                  "device": "cpu", "log_every": 50, "schedule": "cosine"},
    })
    train(cfg, tmp_path / "run")
    from wordlm.api import LanguageModel

    lm = LanguageModel.load(tmp_path / "run")
    measured = lm.evaluate(paths["test"], batch_size=1)["ppl"]
    truth = true_perplexity(P)
    print(f"markov chain: true ppl {truth:.4f}, model ppl {measured:.4f}")
    assert abs(measured - truth) / truth < 0.10, (measured, truth)
    assert measured > truth * 0.97  # a model cannot beat the source: far below would mean a leak


@needs_cpu_bf16
def test_bf16_autocast_reaches_the_same_perplexity_as_fp32(small_corpus, tmp_path):
    args = {"epochs": 4, "optimizer": "adamw", "lr": 0.02}
    fp32 = train(tiny_config(small_corpus, **args), tmp_path / "fp32")
    bf16 = train(tiny_config(small_corpus, **args, precision="bf16"), tmp_path / "bf16")
    # Parity as users need it: bf16 costs no quality (measured: 2.544 vs 2.649 here, trajectories differ).
    assert bf16.best_valid_ppl <= fp32.best_valid_ppl * 1.03
    assert bf16.best_valid_ppl != fp32.best_valid_ppl  # bf16 really ran


@pytest.mark.slow
def test_compiled_training_matches_eager(small_corpus, tmp_path):
    eager = train(tiny_config(small_corpus, max_steps=5), tmp_path / "eager")
    compiled = train(tiny_config(small_corpus, max_steps=5, compile=True), tmp_path / "compiled")
    assert compiled.best_valid_loss == pytest.approx(eager.best_valid_loss, rel=1e-4)


def test_a_valid_record_says_when_its_result_was_known_and_how_long_the_pass_took(small_corpus, tmp_path,
                                                                                     monkeypatch):
    # Time to a target perplexity counts the validation pass that measured it.
    import time

    from typer.testing import CliRunner

    import wordlm.train as train_module
    from wordlm.cli import app

    slow = train_module.total_nll

    def slow_total_nll(*args, **kwargs):
        time.sleep(0.2)
        return slow(*args, **kwargs)

    monkeypatch.setattr(train_module, "total_nll", slow_total_nll)
    out = tmp_path / "run"
    train(tiny_config(small_corpus, epochs=0, max_steps=20, eval_every=10, log_every=10), out)
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    pairs = [(a, b) for a, b in zip(recs, recs[1:], strict=False) if b["event"] == "valid"]
    assert len(pairs) == 2 and all(a["event"] == "train" for a, _ in pairs)
    for before, valid in pairs:
        assert valid["valid_s"] >= 0.2
        assert valid["elapsed_s"] >= before["elapsed_s"] + 0.2  # the pass is inside the time
    r = CliRunner().invoke(app, ["info", str(out), "--json"])
    assert json.loads(r.output.splitlines()[-1])["valid_s_total"] == pytest.approx(
        sum(v["valid_s"] for _, v in pairs), abs=1e-3)


@pytest.mark.parametrize("slow_part, knobs", [("total_nll", {"eval_every": 4}),
                                               ("save_checkpoint", {"eval_every": 100, "save_every": 4})])
def test_train_tokens_per_second_leave_out_validation_and_checkpoints(small_corpus, tmp_path, monkeypatch,
                                                                      slow_part, knobs):
    # tokens_per_s is training throughput: an interval with a validation pass or a checkpoint in it (made to take
    # 0.5 s here) must not read lower than its steps ran. The steps of this model take milliseconds.
    import time

    import wordlm.train as train_module

    slow = getattr(train_module, slow_part)

    def slowed(*args, **kwargs):
        time.sleep(0.5)
        return slow(*args, **kwargs)

    monkeypatch.setattr(train_module, slow_part, slowed)
    out = tmp_path / "run"
    train(tiny_config(small_corpus, epochs=0, max_steps=12, log_every=4, **knobs), out)
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if r["event"] == "train"]
    assert [r["step"] for r in train_recs] == [4, 8, 12]
    for before, after in zip(train_recs, train_recs[1:], strict=False):  # each interval holds one pause
        seconds = (after["tokens"] - before["tokens"]) / after["tokens_per_s"]
        assert seconds < 0.25, (before["step"], after["step"], seconds)
        assert after["elapsed_s"] - before["elapsed_s"] >= 0.5  # the run's clock still counts the pause


def test_a_sentencepiece_vocabulary_that_does_not_fit_the_text_is_reported(small_corpus, tmp_path, caplog):
    """Too small for the text's characters: one line in the config's words, not sentencepiece's internal check.
    Larger than the text has pieces for: sentencepiece stops early, and the user is told, rather than left to find
    a smaller output layer than the config says."""
    cfg = tiny_config(small_corpus, max_steps=1)
    cfg.tokenizer.kind, cfg.tokenizer.vocab_size = "sentencepiece", 20
    with pytest.raises(ConfigError) as e:  # fewer than the pieces the text needs at the least
        train(cfg, tmp_path / "fits")
    assert str(e.value) == ("tokenizer.vocab_size is 20, but sentencepiece needs at least 21 for this training text "
                            "(each of its characters, <unk> and <eos>): raise tokenizer.vocab_size, or lower "
                            "tokenizer.sp_character_coverage to leave out rare characters")
    cfg.tokenizer.vocab_size = 25
    with caplog.at_level("WARNING", logger="wordlm"):
        train(cfg, tmp_path / "fits")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert load_checkpoint(tmp_path / "fits" / "best").tokenizer.vocab_size == 25
    cfg.tokenizer.vocab_size = 5000
    with caplog.at_level("WARNING", logger="wordlm"):
        train(cfg, tmp_path / "short")
    got = load_checkpoint(tmp_path / "short" / "best").tokenizer.vocab_size
    assert 25 < got < 5000
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"warning: tokenizer.vocab_size is 5000, but sentencepiece found only {got} pieces in the training text: "
        f"the vocabulary has {got}"]


def test_resuming_on_a_changed_training_text_warns(small_corpus, tmp_path, caplog):
    """--resume continues at the checkpoint's position in the text; if the text under data.train is no longer
    the one the run began on, that position means something else, and the user is told."""
    from pathlib import Path

    cfg = tiny_config(small_corpus, max_steps=3)
    train(cfg, tmp_path / "run")
    cfg.train.max_steps = 6
    with caplog.at_level("WARNING", logger="wordlm"):
        train(cfg, tmp_path / "run", resume=True)
    assert not [r for r in caplog.records if "not the text" in r.getMessage()]
    text = Path(small_corpus["train"])
    text.write_text(text.read_text() + "the cat sees the tree\n")
    cfg.train.max_steps = 9
    with caplog.at_level("WARNING", logger="wordlm"):
        train(cfg, tmp_path / "run", resume=True)
    assert [r.getMessage() for r in caplog.records if "not the text" in r.getMessage()] == [
        f"resume: {text} is not the text this run was trained on (its SHA-256 has changed); training goes on from "
        f"the checkpoint's step and stream position in the new text, so it will not match an uninterrupted run"]
