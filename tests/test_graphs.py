"""train.cuda_graphs: the recorded-step path of the training loop, checked on the CPU with a stand-in recorder.

A CUDA graph records the kernels the step launches, with the addresses they read and write, and a replay
launches them again, running none of the step's Python. The stand-in here does the same one level up: while
recording it keeps every ATen operation the step dispatches (forward, backward, clipping and the optimizer
step, through a TorchDispatchMode) with the very tensors it read and produced, then undoes what the recording
run wrote; a replay dispatches those operations again on those tensors, copying each result into the tensor
recorded for it. So a step that only works because its Python runs again (a learning rate passed as a
number, a state swapped for a new tensor, a window not copied into the recorded buffer) trains differently
here, and a host read while recording (.item()) raises, as it does during a capture. What this cannot check
is CUDA itself (cuDNN, streams, memory pools): tests/test_gpu.py does, on a GPU.

oneDNN's CPU LSTM kernels keep state between calls that the stand-in's replay does not reproduce, so these
tests run the CPU LSTM without oneDNN (PyTorch's own kernels, which replay exactly).
"""

import contextlib
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import wordlm.train as train_module
from wordlm.checkpoint import load_checkpoint
from wordlm.config import ConfigError, load_config
from wordlm.graphs import RecordedEvaluation
from wordlm.train import train

from conftest import MASKS, all_differ, awd_like_config, replayed_training_outputs, tiny_config, train_until_sigint

HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default}


@pytest.fixture(autouse=True)
def _no_onednn():
    was = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    yield
    torch.backends.mkldnn.enabled = was


class _Recording(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.before = [], {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_READS:
            raise RuntimeError(f"operation not permitted when stream is capturing ({func} reads a value to the host)")
        schema = func._schema.arguments
        values = list(args) + [kwargs.get(a.name) for a in schema[len(args):]]
        for arg, value in zip(schema, values, strict=False):
            if arg.alias_info is not None and arg.alias_info.is_write:  # keep what it held, to undo the write
                for t in tree_flatten(value)[0]:
                    if isinstance(t, torch.Tensor) and id(t) not in self.before:
                        self.before[id(t)] = (t, t.clone())
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


class RecordOnCPU:
    """A CPU stand-in for wordlm.graphs.CudaGraphs (see the module docstring)."""
    made: list = []

    @staticmethod
    def supports(device):
        return True

    def __init__(self):
        # training steps (recorded with gradients on) and validation windows (recorded without) apart
        self.captures, self.recorded_ops, self.validation_captures = 0, 0, 0
        RecordOnCPU.made.append(self)

    def eager(self):
        return contextlib.nullcontext()

    def capture(self, fn):
        rng = torch.get_rng_state()
        rec = _Recording()
        with rec:
            fn()
        with torch.no_grad():
            for t, held in rec.before.values():  # like a capture, recording has done nothing
                t.copy_(held)
        torch.set_rng_state(rng)
        if torch.is_grad_enabled():
            self.captures += 1
            self.recorded_ops = len(rec.ops)
        else:
            self.validation_captures += 1

        def replay():
            with torch.no_grad():
                for func, args, kwargs, out in rec.ops:
                    new = func(*args, **kwargs)
                    for old, fresh in zip(tree_flatten(out)[0], tree_flatten(new)[0], strict=True):
                        if isinstance(old, torch.Tensor) and isinstance(fresh, torch.Tensor) and old is not fresh:
                            old.copy_(fresh)
        return replay


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
    monkeypatch.setattr(train_module._Loop, "graph_backend", RecordOnCPU)
    graphed, graphed_losses = _run(small_corpus, tmp_path / "graphed", True, optimizer=optimizer, lr=lr)
    rec = RecordOnCPU.made[-1]
    # two recordings: the full windows, and each epoch's shorter last window (recorded when it comes again)
    assert rec.captures == 2 and rec.recorded_ops > 300  # forward, backward and optimizer: all of the step
    assert graphed.steps == eager.steps
    # SGD comes out bit-equal. AdamW does not quite: the recorded step reads its learning rate from a float32
    # tensor (what the CUDA kernels take), eager steps from a Python float (the losses end 4e-7 apart). A fault
    # (a stale window, state or learning rate) moves the losses by 1e-3 and more.
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(graphed_losses, eager_losses, **tol)
    for (name, a), b in zip(eager.model.state_dict().items(), graphed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, msg=name, **tol)
    # validation is replayed too (its full windows from the first validation on), and reads the same
    assert rec.validation_captures >= 1
    valid = [[r["valid_loss"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
              if r["event"] == "valid"] for run in ("eager", "graphed")]
    assert len(valid[0]) == 2
    torch.testing.assert_close(valid[1], valid[0], **tol)
    last = load_checkpoint(tmp_path / "graphed", prefer="last", train_state=True)
    assert all(isinstance(g["lr"], float) for g in last.train_state["optimizer"]["param_groups"])


def test_awd_regularisers_are_recorded_too(small_corpus, tmp_path, monkeypatch):
    # Weight drop, embedding and variational dropout, AR/TAR: every mask is drawn inside the recorded step.
    def run(out, graphs):
        cfg = tiny_config(small_corpus, device="auto", epochs=2, log_every=5, cuda_graphs=graphs, ar_alpha=2.0,
                          tar_beta=1.0, weight_decay=1e-4)
        for knob, p in (("num_layers", 2), ("weight_drop", 0.3), ("dropout_embedding", 0.1),
                        ("dropout_input", 0.2), ("dropout_hidden", 0.2), ("dropout_output", 0.3)):
            setattr(cfg.model, knob, p)
        return train(cfg, out).model.state_dict()

    eager = run(tmp_path / "eager", False)
    monkeypatch.setattr(train_module._Loop, "graph_backend", RecordOnCPU)
    graphed = run(tmp_path / "graphed", True)
    assert RecordOnCPU.made[-1].captures == 2
    for name, value in eager.items():
        torch.testing.assert_close(graphed[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_the_warm_up_and_a_window_length_s_first_step_run_eagerly(small_corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module._Loop, "graph_backend", RecordOnCPU)
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
    # 3 warm-up steps, then the first short window; the second short window replays its own recording
    assert counts["eager"] == 3 + 1 and counts["replays"] == result.steps - counts["eager"]


def test_variable_bptt_replays_one_recording_per_window_length(small_corpus, tmp_path, monkeypatch):
    # AWD-LSTM's variable BPTT: window lengths drawn around seq_len, the learning rate scaled by length/seq_len.
    # Each length is recorded the second time it comes, and the run still equals an eager one.
    kw = dict(variable_bptt=True, seq_len=6)
    eager, eager_losses = _run(small_corpus, tmp_path / "eager", False, **kw)
    monkeypatch.setattr(train_module._Loop, "graph_backend", RecordOnCPU)
    lengths, counts = [], {}
    step = train_module._Loop._step

    def spy(self, x, y):
        lengths.append(x.shape[0])
        step(self, x, y)
        counts.update(eager=self.graphs.eager_steps, replays=self.graphs.replays, recorded=sorted(self.graphs.steps))

    monkeypatch.setattr(train_module._Loop, "_step", spy)
    graphed, graphed_losses = _run(small_corpus, tmp_path / "graphed", True, **kw)
    repeated = {n for n in lengths if lengths.count(n) > 1}
    assert len(repeated) >= 3 and counts["replays"] > len(lengths) / 2, (lengths, counts)
    assert RecordOnCPU.made[-1].captures == len(counts["recorded"]) >= 3
    assert set(counts["recorded"]) <= repeated
    torch.testing.assert_close(graphed_losses, eager_losses, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(eager.model.state_dict().items(), graphed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, msg=name, rtol=1e-5, atol=1e-6)


def test_cuda_graphs_are_refused_where_they_cannot_run(small_corpus, tmp_path):
    with pytest.raises(ConfigError, match="adaptive"):
        load_config(None, ["train.cuda_graphs=true", "model.decoder=\"adaptive\""])
    with pytest.raises(ConfigError, match="train.device is cpu"):
        load_config(None, ["train.cuda_graphs=true", "train.device=\"cpu\""])
    if not torch.cuda.is_available():  # device auto lands on the CPU: refused when training starts
        with pytest.raises(ConfigError, match="needs a CUDA device"):
            train(tiny_config(small_corpus, device="auto", cuda_graphs=True), tmp_path / "run")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_refusing_cuda_graphs_on_the_cpu_leaves_an_existing_run_alone(small_corpus, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(small_corpus, device="auto", epochs=1), run)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        train(tiny_config(small_corpus, device="auto", cuda_graphs=True), run, overwrite=True)
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before


def test_a_host_read_in_the_step_is_refused_in_one_line_telling_what_to_do(small_corpus, tmp_path, monkeypatch):
    clip = torch.nn.utils.clip_grad_norm_

    def clip_and_read(*args, **kwargs):
        norm = clip(*args, **kwargs)
        float(norm)  # a host read: fine eagerly, impossible inside a CUDA graph
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_and_read)
    monkeypatch.setattr(train_module._Loop, "graph_backend", RecordOnCPU)
    with pytest.raises(ConfigError) as e:
        train(tiny_config(small_corpus, device="auto", cuda_graphs=True), tmp_path / "run")
    assert str(e.value).startswith("train.cuda_graphs: the training step could not be recorded as a CUDA graph "
                                   "(operation not permitted when stream is capturing")
    assert str(e.value).endswith("; set train.cuda_graphs = false") and "\n" not in str(e.value)


def test_a_recorded_run_stopped_and_resumed_matches_one_that_went_straight(small_corpus, tmp_path, monkeypatch):
    # The resumed process records the step anew, from the restored state, weights and optimizer.
    monkeypatch.setattr(train_module._Loop, "graph_backend", RecordOnCPU)
    cfg = tiny_config(small_corpus, device="auto", epochs=3, eval_every=7, schedule="cosine", cuda_graphs=True)
    cfg.model.dropout = 0.3
    train(cfg, tmp_path / "straight")
    train_until_sigint(monkeypatch, cfg, tmp_path / "cut", 17)
    train(cfg, tmp_path / "cut", resume=True)
    a = load_checkpoint(tmp_path / "straight", prefer="last").model_state
    b = load_checkpoint(tmp_path / "cut", prefer="last").model_state
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


def test_the_awd_recipe_with_variable_bptt_replays_like_eager_steps(small_corpus, tmp_path, monkeypatch):
    # ptb-awd-gpu.toml's ingredients, shrunk (conftest's awd_like_config): every mask and AR/TAR in one recording
    # per window length.
    eager = train(awd_like_config(small_corpus, device="auto"), tmp_path / "eager")
    monkeypatch.setattr(train_module._Loop, "graph_backend", RecordOnCPU)
    graphed = train(awd_like_config(small_corpus, device="auto", cuda_graphs=True), tmp_path / "graphed")
    assert RecordOnCPU.made[-1].captures >= 3
    assert eager.best_valid_ppl < 16  # it learns: the GPU test asks the same recipe in bf16 for < 18
    for (name, a), b in zip(eager.model.state_dict().items(), graphed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, msg=name, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("last", [0, 12], ids=["equal-layers", "awd-shape"])
def test_recorded_validation_computes_what_total_nll_does(last):
    # One recording per window length (the full windows, then the text's shorter last one), replayed along the
    # text with the LSTM state carried in place; weights changed by training between validations are read.
    from wordlm.config import ModelConfig
    from wordlm.data import Streams
    from wordlm.evaluate import total_nll
    from wordlm.model import LSTMLanguageModel

    torch.manual_seed(0)
    model = LSTMLanguageModel(50, ModelConfig(embedding_size=12, hidden_size=16, num_layers=2, dropout=0.3,
                                              last_hidden_size=last, tie_weights=bool(last)))
    model.train()  # validation switches to eval mode (no dropout) and back
    streams = Streams(torch.randint(0, 50, (2 * 61 + 1,)).numpy(), 2)  # 61 rows: windows of 7, the last of 4
    rec = RecordedEvaluation(RecordOnCPU())
    for n in range(3):
        got = rec.total_nll(model, streams, 7, "fp32")
        assert model.training
        assert got == total_nll(model, streams, 7)
        assert rec.backend.validation_captures == min(n + 1, 2)
        with torch.no_grad():
            for p in model.parameters():  # a training step between validations
                p.add_(torch.randn_like(p), alpha=0.05)
    assert rec.replays == 7 + 9 + 9  # eager: the first full window and the short one, then the short one
    # NT-ASGD's average, once it starts, is another module with its own weights: recorded anew, not replayed
    average = torch.optim.swa_utils.AveragedModel(model).module
    with torch.no_grad():
        for p in average.parameters():
            p.mul_(0.5)
    for _ in range(2):
        assert rec.total_nll(average, streams, 7, "fp32") == total_nll(average, streams, 7)
    assert rec.backend.validation_captures == 4
    # and another number of streams: the state buffers have another shape
    three = Streams(torch.randint(0, 50, (3 * 40 + 1,)).numpy(), 3)
    for _ in range(2):
        assert rec.total_nll(average, three, 7, "fp32") == total_nll(average, three, 7)


def test_wordlm_eval_with_recorded_windows_reads_as_without(demo_run, monkeypatch):
    # `wordlm eval --cuda-graphs`: the same figures as plain evaluation, at one stream (every window replayed
    # but the first and the short last one) and at several.
    from wordlm.api import LanguageModel

    monkeypatch.setattr("wordlm.graphs.CudaGraphs", RecordOnCPU)
    lm = LanguageModel.load(demo_run)
    for streams in (1, 3):
        plain = lm.evaluate(lm.config.data.valid, batch_size=streams, seq_len=35)
        made = len(RecordOnCPU.made)
        recorded = lm.evaluate(lm.config.data.valid, batch_size=streams, seq_len=35, cuda_graphs=True)
        assert len(RecordOnCPU.made) == made + 1 and RecordOnCPU.made[-1].validation_captures == 1
        assert recorded == plain


def test_a_forward_pass_that_cannot_be_recorded_is_refused_in_one_line(small_corpus, tmp_path, demo_run,
                                                                       monkeypatch):
    # A host read inside the evaluated forward pass cannot be recorded: training (validation) and wordlm eval
    # each say so in one line, with what to do, instead of a traceback.
    from wordlm.api import LanguageModel
    from wordlm.errors import UsageError
    from wordlm.model import LSTMLanguageModel

    nll = LSTMLanguageModel.nll

    def nll_and_read(self, *args, **kwargs):
        out = nll(self, *args, **kwargs)
        float(out[0].sum())  # a host read: fine eagerly, impossible inside a CUDA graph
        return out

    monkeypatch.setattr(LSTMLanguageModel, "nll", nll_and_read)  # validation's forward, not the training step's
    monkeypatch.setattr(train_module._Loop, "graph_backend", RecordOnCPU)
    monkeypatch.setattr("wordlm.graphs.CudaGraphs", RecordOnCPU)
    with pytest.raises(ConfigError) as e:
        train(tiny_config(small_corpus, device="auto", cuda_graphs=True, epochs=2), tmp_path / "run")
    assert str(e.value).startswith("train.cuda_graphs: validation's forward pass could not be recorded as a CUDA "
                                   "graph (operation not permitted when stream is capturing")
    assert str(e.value).endswith("; set train.cuda_graphs = false") and "\n" not in str(e.value)
    lm = LanguageModel.load(demo_run)
    with pytest.raises(UsageError) as e:
        lm.evaluate(lm.config.data.valid, batch_size=1, cuda_graphs=True)
    assert str(e.value).startswith("cuda_graphs=True: the forward pass could not be recorded as a CUDA graph")
    assert str(e.value).endswith("; drop it") and "\n" not in str(e.value)


def test_wordlm_eval_refuses_to_record_the_adaptive_softmax(small_corpus, tmp_path):
    from typer.testing import CliRunner

    from wordlm.cli import app

    cfg = tiny_config(small_corpus, device="auto")
    cfg.model.decoder, cfg.model.adaptive_cutoffs = "adaptive", [8]
    train(cfg, tmp_path / "run")
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "run"), "--device", "cpu", "--cuda-graphs"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.startswith("error: --cuda-graphs cannot record the adaptive softmax"), result.output


def test_recorded_validation_evaluates_the_nt_asgd_average(small_corpus, tmp_path, monkeypatch):
    # With NT-ASGD averaging, validation reads the running average, not the trained weights: the recorded
    # windows must be the average's (a recording of the wrong module would read like the raw iterate).
    def run(out, graphs):
        cfg = tiny_config(small_corpus, device="auto", optimizer="ntasgd", average_from_start=True, eval_every=3,
                          max_steps=24, epochs=0, schedule="constant", cuda_graphs=graphs)
        train(cfg, out)
        return [r["valid_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                if r["event"] == "valid"]

    eager = run(tmp_path / "eager", False)
    monkeypatch.setattr(train_module._Loop, "graph_backend", RecordOnCPU)
    graphed = run(tmp_path / "graphed", True)
    assert RecordOnCPU.made[-1].validation_captures >= 1 and len(eager) == 8
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("knob", MASKS)
def test_recorded_forward_draws_fresh_masks_at_each_replay(knob):
    # The stand-in's replays dispatch the recorded operations again, random draws included, as a CUDA graph's
    # replays advance the generator: a mask made outside those operations (kept from the recording run) would
    # read the same at every replay. tests/test_gpu.py checks the same with real CUDA graphs.
    assert all_differ(replayed_training_outputs(RecordOnCPU(), knob, "cpu"))
    # the control: at p = 0 nothing is drawn and the replays agree, so what differs above is the masks
    first, *rest = replayed_training_outputs(RecordOnCPU(), knob, "cpu", p=0.0)
    assert all(torch.equal(first, r) for r in rest)
