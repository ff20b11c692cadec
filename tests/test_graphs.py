"""train.cuda_graphs: the recorded-step path of the training loop, checked on the CPU with a stand-in recorder.

A real CUDA graph records the step's kernels once and replays them; here "recording" keeps the step function
and a replay calls it again. What this checks is everything around the recording that a real graph also
depends on: the window copied into fixed input buffers, the LSTM state carried and reset in place, the
learning rate read from a tensor, shorter windows and the warm-up run eagerly, one recording. The real thing
is checked on a GPU by tests/test_gpu.py.
"""

import contextlib
import json

import pytest
import torch

import wordlm.train as train_module
from wordlm.checkpoint import load_checkpoint
from wordlm.config import ConfigError, load_config
from wordlm.train import train

from conftest import tiny_config, train_until_sigint


class ReplayOnCPU:
    made: list = []

    @staticmethod
    def supports(device):
        return True

    def __init__(self):
        self.captures = 0
        ReplayOnCPU.made.append(self)

    def eager(self):
        return contextlib.nullcontext()

    def capture(self, fn):  # like a capture, recording runs nothing
        self.captures += 1
        return fn


def _run(corpus, out, graphs: bool, **kw):
    cfg = tiny_config(corpus, device="auto", epochs=2, log_every=5, schedule="cosine", cuda_graphs=graphs, **kw)
    cfg.model.dropout = 0.3  # the same RNG draws in both runs, or the weights would differ
    result = train(cfg, out)
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if r["event"] == "train"]
    return result, losses


@pytest.mark.parametrize("optimizer,lr", [("sgd", 1.0), ("adamw", 0.01)])
def test_recorded_steps_train_like_eager_steps(small_corpus, tmp_path, monkeypatch, optimizer, lr):
    eager, eager_losses = _run(small_corpus, tmp_path / "eager", False, optimizer=optimizer, lr=lr)
    monkeypatch.setattr(train_module._Loop, "graph_backend", ReplayOnCPU)
    graphed, graphed_losses = _run(small_corpus, tmp_path / "graphed", True, optimizer=optimizer, lr=lr)
    rec = ReplayOnCPU.made[-1]
    assert rec.captures == 1
    assert graphed.steps == eager.steps
    # Not bit-equal: the recorded step reads its learning rate from a float32 tensor (what the CUDA kernels
    # take), eager steps from a Python float (AdamW: 3e-8 apart after a step). A plumbing fault, such as a
    # stale window or state, moves the losses by 1e-2 and more.
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(graphed_losses, eager_losses, **tol)
    for (name, a), b in zip(eager.model.state_dict().items(), graphed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, msg=name, **tol)
    last = load_checkpoint(tmp_path / "graphed", prefer="last", train_state=True)
    assert all(isinstance(g["lr"], float) for g in last.train_state["optimizer"]["param_groups"])


def test_shorter_windows_and_the_warm_up_run_eagerly(small_corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module._Loop, "graph_backend", ReplayOnCPU)
    counts = {}
    step = train_module._Loop._step

    def spy(self, x, y):
        step(self, x, y)
        counts.update(eager=self.graphs.eager_steps, replays=self.graphs.replays)
        counts.setdefault("short", 0)
        counts["short"] += x.shape[0] != self.tc.seq_len

    monkeypatch.setattr(train_module._Loop, "_step", spy)
    result, _ = _run(small_corpus, tmp_path / "run", True)
    assert counts["short"] == 2  # one per epoch: this text's rows do not divide into windows of 8
    assert counts["eager"] == 3 + counts["short"] and counts["replays"] == result.steps - counts["eager"]


def test_cuda_graphs_are_refused_where_they_cannot_run(small_corpus, tmp_path):
    with pytest.raises(ConfigError, match="variable_bptt"):
        load_config(None, ["train.cuda_graphs=true", "train.variable_bptt=true"])
    with pytest.raises(ConfigError, match="adaptive"):
        load_config(None, ["train.cuda_graphs=true", "model.decoder=\"adaptive\""])
    with pytest.raises(ConfigError, match="train.device is cpu"):
        load_config(None, ["train.cuda_graphs=true", "train.device=\"cpu\""])
    if not torch.cuda.is_available():  # device auto lands on the CPU: refused when the loop starts
        with pytest.raises(ConfigError, match="needs a CUDA device"):
            train(tiny_config(small_corpus, device="auto", cuda_graphs=True), tmp_path / "run")


def test_a_step_that_cannot_be_recorded_is_one_line_telling_what_to_do(small_corpus, tmp_path, monkeypatch):
    class Refuses(ReplayOnCPU):
        def capture(self, fn):
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(train_module._Loop, "graph_backend", Refuses)
    with pytest.raises(ConfigError) as e:
        train(tiny_config(small_corpus, device="auto", cuda_graphs=True), tmp_path / "run")
    assert str(e.value) == ("train.cuda_graphs: the training step could not be recorded as a CUDA graph (CUDA "
                            "error: operation not permitted when stream is capturing); set train.cuda_graphs = false")


def test_a_recorded_run_stopped_and_resumed_matches_one_that_went_straight(small_corpus, tmp_path, monkeypatch):
    # The resumed process records the step anew, from the restored state, weights and optimizer.
    monkeypatch.setattr(train_module._Loop, "graph_backend", ReplayOnCPU)
    cfg = tiny_config(small_corpus, device="auto", epochs=3, eval_every=7, schedule="cosine", cuda_graphs=True)
    cfg.model.dropout = 0.3
    train(cfg, tmp_path / "straight")
    train_until_sigint(monkeypatch, cfg, tmp_path / "cut", 17)
    train(cfg, tmp_path / "cut", resume=True)
    a = load_checkpoint(tmp_path / "straight", prefer="last").model_state
    b = load_checkpoint(tmp_path / "cut", prefer="last").model_state
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
