"""fp32 arithmetic on a GPU: TF32 in training only where train.tf32 allows it, IEEE fp32 in every evaluation.

PyTorch lets cuDNN, which runs nn.LSTM, use TF32 tensor cores by default (cuBLAS's matmuls it does not), so an
"fp32" figure measured on an Ampere or later GPU is not fp32 unless something says so. The flags are process-wide
settings that a CPU build of PyTorch holds too, so what wordlm sets is checked here; that cuDNN obeys is checked
on a GPU (tests/test_gpu.py).
"""

import contextlib

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


@pytest.fixture
def flags():
    """PyTorch's TF32 flags as a test leaves them: put back as they were."""
    before = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    yield
    torch.backends.cudnn.allow_tf32 = before[0]
    torch.set_float32_matmul_precision(before[1])


def now():
    return torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()


def test_fp32_math_sets_pytorch_s_tf32_flags_and_puts_them_back(flags):
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")  # a program that chose TF32 matmuls for itself
    with fp32_math(CUDA, tf32=False):
        assert now() == (False, "highest")  # IEEE in cuDNN and in cuBLAS
    assert now() == (True, "high")
    torch.backends.cudnn.allow_tf32 = False
    with fp32_math(CUDA, tf32=True):
        assert now() == (True, "high")  # cuDNN may; the matmuls keep the program's own choice
    assert now() == (False, "high")
    with pytest.raises(KeyError), fp32_math(CUDA, tf32=True):
        raise KeyError  # an error inside the block puts them back too
    assert now() == (False, "high")


def test_fp32_math_leaves_the_flags_alone_on_a_cpu(flags):
    torch.backends.cudnn.allow_tf32 = True
    for tf32 in (False, True):
        with fp32_math(torch.device("cpu"), tf32=tf32):
            assert now() == (True, "highest")


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
