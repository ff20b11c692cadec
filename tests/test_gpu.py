"""GPU checks (run with: .venv/bin/pytest -m gpu on a machine with CUDA). Skipped elsewhere."""

import warnings

import pytest
import torch

from wordlm.config import ModelConfig
from wordlm.model import LSTMLanguageModel

from conftest import MASKS, all_differ, awd_like_config, replayed_training_outputs, tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("last", [0, 32], ids=["equal-layers", "awd-shape"])
def test_weight_drop_uses_cudnn_without_the_contiguous_chunk_warning(last):
    m = LSTMLanguageModel(100, ModelConfig(embedding_size=32, hidden_size=64, num_layers=3, weight_drop=0.5,
                                           dropout_hidden=0.2, last_hidden_size=last)).cuda().train()
    ids = torch.randint(0, 100, (20, 8), device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "weights are not part of single contiguous chunk" would fail here
        nll, _ = m(ids, None, ids)
        nll.mean().backward()
    assert torch.backends.cudnn.enabled and all(p.grad is not None for p in m.parameters())


def test_rotated_streams_on_the_gpu_read_as_on_the_host():
    # train.partial_shuffle on a GPU rotates the grid on the device once an epoch; windows must match the host's.
    import numpy as np

    from wordlm.data import Streams

    rng = np.random.default_rng(1)
    ids = rng.integers(0, 30_000, 5_003).astype(np.uint16)
    host, gpu = Streams(ids, 6), Streams(ids, 6, "cuda")
    for shifts in (rng.integers(0, host.rows, 6), None, rng.integers(0, host.rows, 6)):
        host.rotate(shifts)
        gpu.rotate(shifts)
        for row in range(0, host.rows - 1, 37):
            for a, b in zip(host.window(row, 37), gpu.window(row, 37), strict=True):
                assert b.is_cuda and torch.equal(a, b.cpu())


def test_training_on_the_gpu(small_corpus, tmp_path):
    from wordlm.train import train

    result = train(tiny_config(small_corpus, device="cuda", epochs=2, precision="bf16"), tmp_path / "run")
    assert result.best_valid_ppl < 18


def test_the_bf16_check_tells_the_truth_about_this_gpu():
    """bf16_supported says yes on the GPU exactly when wordlm's own model can take a bf16 autocast step on it,
    forward and backward (an Ampere or later GPU can; a V100 or T4 may not)."""
    from wordlm.evaluate import autocast, bf16_supported
    from wordlm.model import build_model

    device = torch.device("cuda")
    model = build_model(ModelConfig(embedding_size=16, hidden_size=16, num_layers=2, dropout=0.2), 30).to(device)
    ids = torch.randint(0, 30, (6, 3), device=device)
    try:
        with autocast(device, "bf16"):
            loss, _ = model(ids, targets=ids, mean=True)
        loss.backward()
        torch.cuda.synchronize()
        ran = True
    except RuntimeError:
        ran = False
    assert bf16_supported(device) == ran
    assert ran or torch.cuda.get_device_capability()[0] < 8  # an Ampere or later GPU runs it


def _sync_warnings(cfg, out) -> int:
    from wordlm.train import train

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(cfg, out)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.filterwarnings("ignore:Synchronization debug mode is a prototype feature")  # torch's, once a process
def test_the_training_loop_makes_no_host_sync_per_step(small_corpus, tmp_path):
    # Only the setup, the log intervals, validation and checkpoints may sync: 60 more steps add none.
    torch.cuda.set_sync_debug_mode("warn")
    try:  # the probe itself: every sync warns, not just the first from a place
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(5):
                torch.ones(1, device="cuda").item()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert sum("synchroniz" in str(w.message) for w in caught) == 5
    kw = dict(device="cuda", log_every=10_000, eval_every=10_000, epochs=0, schedule="cosine")
    short = _sync_warnings(tiny_config(small_corpus, max_steps=30, **kw), tmp_path / "short")
    long = _sync_warnings(tiny_config(small_corpus, max_steps=90, **kw), tmp_path / "long")
    assert long - short < 5, (short, long)


def test_nt_asgd_averaging_makes_no_host_sync_per_step(small_corpus, tmp_path):
    # AveragedModel.update_parameters would sync three times a step; wordlm's own running mean must not.
    kw = dict(device="cuda", log_every=10_000, eval_every=10_000, epochs=0, optimizer="ntasgd",
              average_from_start=True)
    short = _sync_warnings(tiny_config(small_corpus, max_steps=30, **kw), tmp_path / "short")
    long = _sync_warnings(tiny_config(small_corpus, max_steps=90, **kw), tmp_path / "long")
    assert long - short < 5, (short, long)


def test_train_records_report_the_gpu_memory_peak(small_corpus, tmp_path):
    # peak_mem_mb on a GPU is what PyTorch's allocator has reserved there, not the host's RSS.
    import json

    from wordlm.train import train

    result = train(tiny_config(small_corpus, device="cuda", max_steps=20, log_every=5), tmp_path / "run")
    recs = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    mems = [r["peak_mem_mb"] for r in recs if r["event"] == "train"]
    assert len(mems) == 4 and 0 < mems[0] and mems == sorted(mems)
    assert result.peak_mem_mb == torch.cuda.max_memory_reserved() / 2**20 >= mems[-1] - 0.05  # records: 0.1 MiB


def _losses(out) -> list[float]:
    import json

    recs = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in recs if r["event"] == "train"]


@pytest.mark.parametrize("optimizer,lr,precision", [("sgd", 1.0, "fp32"), ("adamw", 0.01, "bf16")])
def test_cuda_graphs_train_like_eager_steps(small_corpus, tmp_path, optimizer, lr, precision):
    # A real recording and its replays against eager steps (no dropout: the graph draws its own masks).
    from wordlm.train import train

    kw = dict(device="cuda", epochs=2, log_every=5, optimizer=optimizer, lr=lr, precision=precision,
              schedule="cosine")
    eager = train(tiny_config(small_corpus, **kw), tmp_path / "eager")
    graphed = train(tiny_config(small_corpus, cuda_graphs=True, **kw), tmp_path / "graphed")
    torch.testing.assert_close(_losses(tmp_path / "graphed"), _losses(tmp_path / "eager"), rtol=1e-3, atol=1e-3)
    for a, b in zip(eager.model.parameters(), graphed.model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)


def test_cuda_graphs_learn_with_dropout_and_make_no_host_sync_per_step(small_corpus, tmp_path):
    from wordlm.train import train

    cfg = tiny_config(small_corpus, device="cuda", epochs=2, precision="bf16", cuda_graphs=True)
    cfg.model.dropout = 0.2  # nn.Dropout and the fused LSTM's own (cuDNN) dropout inside the recording
    cfg.model.num_layers = 2
    assert train(cfg, tmp_path / "run").best_valid_ppl < 18
    kw = dict(device="cuda", log_every=10_000, eval_every=10_000, epochs=0, cuda_graphs=True)
    short = _sync_warnings(tiny_config(small_corpus, max_steps=30, **kw), tmp_path / "short")
    long = _sync_warnings(tiny_config(small_corpus, max_steps=90, **kw), tmp_path / "long")
    assert long - short < 5, (short, long)


def test_cuda_graphs_with_variable_bptt_train_like_eager_steps(small_corpus, tmp_path, monkeypatch):
    # One recording per window length, all in one shared memory pool: the replays of many recordings must not
    # disturb each other (no dropout: the graphs draw their own masks).
    from wordlm.train import _Loop, train

    kw = dict(device="cuda", epochs=2, log_every=5, optimizer="sgd", lr=1.0, variable_bptt=True, seq_len=6)
    eager = train(tiny_config(small_corpus, **kw), tmp_path / "eager")
    made = []
    init = _Loop.__init__

    def keep(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(_Loop, "__init__", keep)
    graphed = train(tiny_config(small_corpus, cuda_graphs=True, **kw), tmp_path / "graphed")
    assert len(made[-1].graphs.steps) >= 3 and made[-1].graphs.replays > graphed.steps / 2
    torch.testing.assert_close(_losses(tmp_path / "graphed"), _losses(tmp_path / "eager"), rtol=1e-3, atol=1e-3)
    for a, b in zip(eager.model.parameters(), graphed.model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)


def test_cuda_graphs_record_the_awd_recipe(small_corpus, tmp_path):
    # Weight drop on cuDNN, the narrower last layer, every mask and variable BPTT inside the recordings, in bf16:
    # it must record and learn about as well as on the CPU (eager, fp32: best valid ppl 15.1 there).
    from wordlm.train import train

    cfg = awd_like_config(small_corpus, device="cuda", precision="bf16", cuda_graphs=True)
    assert train(cfg, tmp_path / "run").best_valid_ppl < 18


def test_cuda_graphs_with_budgeted_nt_asgd_read_the_average_and_the_raw_iterate(small_corpus, tmp_path):
    # The AWD recipe recorded, NT-ASGD averaging from half-way (train.average_after): validation replays the
    # average's recording and reads the raw iterate eagerly beside it; both must be sane and differ.
    import json
    import math

    from wordlm.train import train

    cfg = awd_like_config(small_corpus, device="cuda", precision="bf16", cuda_graphs=True, optimizer="ntasgd",
                          average_after=0.5, nonmono=50, schedule="constant", eval_every=10)
    result = train(cfg, tmp_path / "run")
    recs = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    after = [r for r in recs if r["event"] == "valid" and "raw_valid_ppl" in r]
    assert [r["trigger"] for r in recs if r["event"] == "averaging"] == ["train.average_after = 0.5"]
    assert after and all(math.isfinite(r["raw_valid_ppl"]) and r["raw_valid_ppl"] != r["valid_ppl"] for r in after)
    assert result.best_valid_ppl < 18


@pytest.mark.parametrize("knob", MASKS)
def test_cuda_graphs_replays_draw_fresh_dropout_masks(knob):
    # A recorded step must regularise like eager steps: every mask (nn.Dropout, whole-word embedding dropout,
    # the locked dropouts, weight drop) drawn anew at each replay from the graph-safe CUDA generator. A mask
    # baked into the recording would train a model that overfits, and still learns (the tests above).
    from wordlm.graphs import CudaGraphs

    assert all_differ(replayed_training_outputs(CudaGraphs(), knob, "cuda"))


def test_checkpoint_host_copies_are_pinned_complete_and_keep_ties():
    # A background save copies the weights into pinned host memory without a wait per tensor; what it returns
    # must already hold the values (the writer thread reads it at once), and tied weights stay one tensor.
    from wordlm.train import _host_copy

    w = torch.randn(1000, 64, device="cuda")
    state = {"embedding.weight": w, "decoder.weight": w, "bias": torch.randn(1000, device="cuda"),
             "nested": [torch.arange(5, device="cuda")], "step": 3}
    expected = {k: (v.cpu().clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
    host = _host_copy(state)
    w.add_(1.0)  # training goes on: the copy must not see it
    assert host["embedding.weight"].is_pinned() and host["embedding.weight"].device.type == "cpu"
    assert host["embedding.weight"] is host["decoder.weight"]
    assert torch.equal(host["embedding.weight"], expected["embedding.weight"])
    assert torch.equal(host["bias"], expected["bias"]) and torch.equal(host["nested"][0], torch.arange(5))
    assert host["step"] == 3


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graphs_validation_reads_like_eager_validation(precision):
    # train.cuda_graphs' validation: CUDA graphs recorded per window length, replayed along the text, against
    # evaluate.total_nll; weights changed between validations (training) must be read by the replays.
    from wordlm.data import Streams
    from wordlm.evaluate import total_nll
    from wordlm.graphs import CudaGraphs, RecordedEvaluation

    torch.manual_seed(0)
    model = LSTMLanguageModel(500, ModelConfig(embedding_size=128, hidden_size=128, num_layers=2, dropout=0.3,
                                               weight_drop=0.3, tie_weights=True)).cuda().train()
    streams = Streams(torch.randint(0, 500, (20 * 300 + 1,)).numpy(), 20, "cuda")  # 300 rows: 9 windows, the last of 19
    rec = RecordedEvaluation(CudaGraphs())
    for _ in range(3):
        got, n = rec.total_nll(model, streams, 35, precision)
        want, m = total_nll(model, streams, 35, precision)
        assert n == m and model.training
        assert got == pytest.approx(want, rel=1e-6 if precision == "fp32" else 1e-4)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=0.02)
    assert rec.recordings == 2 and rec.replays == 7 + 9 + 9


def test_cuda_graphs_eval_reads_like_plain_eval_on_the_gpu(demo_run):
    # `wordlm eval --device cuda --cuda-graphs` at one stream (as the papers' test figures) and at ten, against
    # the same evaluation without recording.
    import json as json_

    from typer.testing import CliRunner

    from wordlm.cli import app

    def ppl(*extra):
        result = CliRunner().invoke(app, ["eval", str(demo_run), "--device", "cuda", "--json", *extra])
        assert result.exit_code == 0, result.output
        return json_.loads(result.output.splitlines()[-1])["ppl"]

    for streams in ("1", "10"):
        plain = ppl("--batch-size", streams)
        assert ppl("--batch-size", streams, "--cuda-graphs") == pytest.approx(plain, rel=1e-4)


def test_dynamic_evaluation_runs_on_the_gpu(demo_run):
    # cuDNN refuses the backward pass of an LSTM in eval mode; dynamic evaluation puts the nn.LSTM modules alone
    # into training mode (dropout off) to keep cuDNN's kernels: it reads like PyTorch's own kernels (cuDNN off).
    # lr 0 keeps static evaluation's kernels: equal to it exactly.
    from pathlib import Path

    from wordlm.api import LanguageModel
    from wordlm.data import Streams, encode_file
    from wordlm.evaluate import dynamic_total_nll, gradient_ms, total_nll

    lm = LanguageModel.load(demo_run, device="cuda")
    text = Path(__file__).resolve().parent.parent / "data" / "tiny" / "valid.txt"
    streams = Streams(encode_file(text, lm.tokenizer).ids, 1, "cuda")
    ms = gradient_ms(lm.model, streams, 5, windows=20)
    static = total_nll(lm.model, streams, 5)
    before = [p.detach().clone() for p in lm.model.parameters()]
    assert dynamic_total_nll(lm.model, streams, 5, lr=0.0, decay=0.0, ms=ms) == static
    adapted, n = dynamic_total_nll(lm.model, streams, 5, lr=1e-5, decay=1e-3, ms=ms)
    assert n == static[1] and adapted != static[0] and adapted == pytest.approx(static[0], rel=0.2)
    with torch.backends.cudnn.flags(enabled=False):
        ms_native = gradient_ms(lm.model, streams, 5, windows=20)
        native, _ = dynamic_total_nll(lm.model, streams, 5, lr=1e-5, decay=1e-3, ms=ms_native)
    assert adapted == pytest.approx(native, rel=1e-4)
    assert not lm.model.training and not any(m.training for m in lm.model.modules())
    assert all(torch.equal(a, b) for a, b in zip(before, lm.model.parameters(), strict=True))


@pytest.mark.parametrize("layered", [False, True], ids=["fused-lstm", "awd-shape"])
def test_dynamic_evaluation_on_cudnn_reads_like_pytorch_s_own_kernels(layered):
    # The AWD shape (one nn.LSTM per layer, a narrower last one, weight drop and every dropout configured) and a
    # fused 2-layer LSTM with its own dropout: adapting on cuDNN (the LSTMs alone in training mode, dropout off)
    # must read what PyTorch's own kernels read, and leave every module in eval mode.
    from wordlm.data import Streams
    from wordlm.evaluate import dynamic_total_nll, gradient_ms

    torch.manual_seed(0)
    knobs = (dict(num_layers=3, last_hidden_size=32, weight_drop=0.5, dropout_hidden=0.3, dropout_input=0.3,
                  dropout_output=0.3, dropout_embedding=0.1) if layered else dict(num_layers=2, dropout=0.5))
    m = LSTMLanguageModel(100, ModelConfig(embedding_size=32, hidden_size=64, tie_weights=layered, **knobs)).cuda()
    m.eval()
    streams = Streams(torch.randint(0, 100, (400,)).numpy(), 1, "cuda")
    ms = gradient_ms(m, streams, 10, windows=10)
    cudnn, n = dynamic_total_nll(m, streams, 10, lr=1e-3, decay=1e-3, ms=ms)
    with torch.backends.cudnn.flags(enabled=False):
        native, _ = dynamic_total_nll(m, streams, 10, lr=1e-3, decay=1e-3, ms=ms)
    assert n == 399 and cudnn == pytest.approx(native, rel=1e-4)
    assert not any(mod.training for mod in m.modules())


def test_fp32_evaluation_is_ieee_fp32_in_cudnn_s_lstm():
    """Inside fp32_math(tf32=False), as every wordlm evaluation is, cuDNN's LSTM reads a float64 reference to
    fp32's accuracy. With TF32 allowed (train.tf32, PyTorch's default) an Ampere or later GPU rounds the products'
    inputs to a 10-bit mantissa; both errors are printed (pytest -s) for the record."""
    import copy

    from wordlm.evaluate import fp32_math

    torch.manual_seed(0)
    lstm = torch.nn.LSTM(650, 650, 2)  # the paper's medium model's LSTM, at its batch and window
    x = torch.randn(35, 20, 650)
    errors = {}
    with torch.no_grad():
        reference = copy.deepcopy(lstm).double()(x.double())[0]
        gpu, xg = lstm.cuda(), x.cuda()
        for tf32 in (False, True):
            with fp32_math(torch.device("cuda"), tf32=tf32):
                errors[tf32] = (gpu(xg)[0].double().cpu() - reference).abs().max().item()
    print(f"largest output error against float64: IEEE {errors[False]:.2e}, TF32 allowed {errors[True]:.2e}")
    assert errors[False] < 1e-5
