"""fp32 arithmetic on a GPU: TF32 in training only where train.tf32 allows it, IEEE fp32 in every evaluation.

PyTorch lets cuDNN, which runs nn.LSTM, use TF32 tensor cores by default (cuBLAS's matmuls it does not), so an
"fp32" figure measured on an Ampere or later GPU is not fp32 unless something says so. The flags are process-wide
settings that a CPU build of PyTorch holds too, so what wordlm sets is checked here; that cuDNN obeys is checked
on a GPU (tests/test_gpu.py).
"""

import contextlib
import warnings

import pytest
import torch

import wordlm.evaluate as evaluate_module
import wordlm.graphs as graphs_module
import wordlm.train as train_module
from wordlm import load
from wordlm.evaluate import fp32_math
from wordlm.graphs import RecordedEvaluation
from wordlm.train import train

from conftest import tiny_config

CUDA = torch.device("cuda")  # only named: fp32_math sets flags and starts nothing on the device
CUDNN = [("cuda", "conv"), ("cuda", "rnn")]  # where PyTorch keeps cuDNN's TF32 flags (its newer API reads them)


@pytest.fixture
def flags():
    """PyTorch's cuDNN TF32 flags as a test leaves them: put back as they were."""
    before = [torch._C._get_fp32_precision_getter(*k) for k in CUDNN]
    yield
    for k, v in zip(CUDNN, before, strict=True):
        torch._C._set_fp32_precision_setter(*k, v)


def test_fp32_math_sets_cudnn_s_tf32_flag_and_puts_it_back(flags):
    cudnn = torch.backends.cudnn
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of PyTorch's own warnings about these flags comes out either
        for outside in (True, False):
            cudnn.allow_tf32 = outside
            for tf32 in (False, True):
                with fp32_math(CUDA, tf32=tf32):
                    assert cudnn.allow_tf32 is tf32
                    assert torch.get_float32_matmul_precision() == "highest"  # matmuls: left alone, IEEE
                assert cudnn.allow_tf32 is outside
        with pytest.raises(KeyError), fp32_math(CUDA, tf32=True):
            raise KeyError  # an error inside the block puts it back too
        assert cudnn.allow_tf32 is False


def test_fp32_math_leaves_the_flags_alone_on_a_cpu_and_where_pytorch_cannot_read_them(flags):
    torch.backends.cudnn.allow_tf32 = True
    for tf32 in (False, True):
        with fp32_math(torch.device("cpu"), tf32=tf32):
            assert torch.backends.cudnn.allow_tf32 is True
    torch.backends.cudnn.rnn.fp32_precision = "ieee"  # set through the newer API, conv through the older:
    with pytest.raises(RuntimeError, match="mix"):  # PyTorch refuses to read the older flag now
        _ = torch.backends.cudnn.allow_tf32
    with fp32_math(CUDA, tf32=True):  # so it is left as it is, and nothing fails
        assert torch.backends.cudnn.rnn.fp32_precision == "ieee"
    assert [torch._C._get_fp32_precision_getter(*k) for k in CUDNN] == ["tf32", "ieee"]


@pytest.fixture
def calls(monkeypatch):
    """Every fp32_math call the training loop and the evaluations make, as (device type, tf32)."""
    made = []

    def recording(device, tf32):
        made.append((device.type, tf32))
        return fp32_math(device, tf32)

    for module in (train_module, evaluate_module, graphs_module):
        monkeypatch.setattr(module, "fp32_math", recording)
    return made


@pytest.mark.parametrize("tf32", [True, False])
def test_training_follows_train_tf32_and_validation_is_ieee(small_corpus, tmp_path, calls, tf32):
    cfg = tiny_config(small_corpus, epochs=1)
    cfg.train.tf32 = tf32
    train(cfg, tmp_path / "run")
    assert calls[0] == ("cpu", tf32)  # around the whole run
    assert calls[1:] and set(calls[1:]) == {("cpu", False)}  # each validation


def test_every_evaluation_is_ieee(demo_run, calls):
    lm = load(demo_run)
    test = lm.config.data.test
    lm.evaluate(test, batch_size=1)
    assert calls == [("cpu", False)]
    calls.clear()
    lm.evaluate_dynamic(test, lr=1e-3, decay=0.0, ms_windows=5)
    assert len(calls) == 2 and set(calls) == {("cpu", False)}  # the gradient statistics, then the adapted pass


def test_recorded_evaluation_is_ieee(demo_run, calls):
    class Eager:  # a "recording" that runs the window at each replay: only where the flags are set matters here
        def eager(self):
            return contextlib.nullcontext()

        def capture(self, fn):
            return fn

    lm = load(demo_run)
    streams = lm._streams(lm.config.data.valid, 2)[1]
    RecordedEvaluation(Eager()).total_nll(lm.model, streams, 35, "fp32")
    assert calls == [("cpu", False)]
