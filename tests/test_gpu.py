"""GPU checks (run with: .venv/bin/pytest -m gpu on a machine with CUDA). Skipped elsewhere."""

import warnings

import pytest
import torch

from wordlm.config import ModelConfig
from wordlm.model import LSTMLanguageModel

from conftest import tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_weight_drop_uses_cudnn_without_the_contiguous_chunk_warning():
    m = LSTMLanguageModel(100, ModelConfig(embedding_size=32, hidden_size=64, num_layers=3, weight_drop=0.5,
                                           dropout_hidden=0.2)).cuda().train()
    ids = torch.randint(0, 100, (20, 8), device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "weights are not part of single contiguous chunk" would fail here
        nll, _ = m(ids, None, ids)
        nll.mean().backward()
    assert torch.backends.cudnn.enabled and all(p.grad is not None for p in m.parameters())


def test_training_on_the_gpu(small_corpus, tmp_path):
    from wordlm.train import train

    result = train(tiny_config(small_corpus, device="cuda", epochs=2, precision="bf16"), tmp_path / "run")
    assert result.best_valid_ppl < 18


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
