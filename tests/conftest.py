import os
import random
from pathlib import Path

import pytest
import torch
from torch import Tensor

# The test models are tiny: one thread is fastest, and it leaves the other core free (no OpenMP spinning).
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "data" / "tiny"


def _cpu_bf16() -> bool:
    from wordlm.evaluate import bf16_supported

    return bf16_supported(torch.device("cpu"))


# bf16 on the CPU needs oneDNN's bf16 LSTM kernel (AVX-512 or Arm bf16): an AVX2-only CPU refuses it, and the
# tests of that refusal (tests/test_cli.py) run on every CPU.
needs_cpu_bf16 = pytest.mark.skipif(not _cpu_bf16(),
                                    reason="this CPU has no bf16 LSTM kernel (oneDNN's needs AVX-512 or Arm bf16)")


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory):
    """Keep the corpus cache of the tests out of the user's ~/.cache."""
    os.environ["WORDLM_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield


@pytest.fixture(autouse=True, scope="session")
def _python_sigint_handler():
    """The Ctrl-C tests raise SIGINT and expect Python's own handler, whatever the suite inherited: a shell
    script's background job (`make test &`) starts with SIGINT ignored, which training keeps ignored."""
    import signal

    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, inherited)


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture
def small_corpus(tmp_path) -> dict:
    """A ~20-word vocabulary corpus with a fixed word order, in train/valid/test files."""
    rng = random.Random(0)
    subjects = ["the cat", "a dog", "the bird", "my friend"]
    verbs = ["sees", "likes", "eats", "finds"]
    objects = ["the fish", "a ball", "the tree", "some food"]

    def lines(n):
        return [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}" for _ in range(n)]

    return {name: str(write_lines(tmp_path / f"{name}.txt", lines(n)))
            for name, n in (("train", 400), ("valid", 60), ("test", 60))}


def train_until_sigint(monkeypatch, cfg, out: Path, at_window: int) -> str:
    """Train `cfg` into `out` with a SIGINT raised as the `at_window`-th training window is read (as a Ctrl-C
    would land), expect the clean stop, and return its message."""
    import signal

    from wordlm.data import Streams
    from wordlm.errors import TrainingInterrupted
    from wordlm.train import train

    calls = {"n": 0}
    window = Streams.window

    def window_then_sigint(self, row, seq_len):
        if self.batch_size == cfg.train.batch_size:
            calls["n"] += 1
            if calls["n"] == at_window:
                signal.raise_signal(signal.SIGINT)
        return window(self, row, seq_len)

    monkeypatch.setattr(Streams, "window", window_then_sigint)
    try:
        with pytest.raises(TrainingInterrupted) as stopped:
            train(cfg, out)
    finally:
        monkeypatch.setattr(Streams, "window", window)
    return str(stopped.value)


def tiny_config(corpus: dict, **train):
    """A 1-layer LSTM of width 8 on `corpus`: seconds to train, deterministic on the CPU."""
    from wordlm.config import Config

    raw = {
        "data": {"train": corpus["train"], "valid": corpus["valid"], "test": corpus["test"]},
        "model": {"embedding_size": 8, "hidden_size": 8, "num_layers": 1},
        "train": {"batch_size": 4, "seq_len": 8, "optimizer": "sgd", "lr": 1.0, "epochs": 1, "log_every": 1,
                  "device": "cpu", "eval_batch_size": 2, "seed": 7, **train},
    }
    return Config.from_dict(raw)


def awd_like_config(corpus, **train):
    """ptb-awd-gpu.toml's ingredients, shrunk: 16 -> 32 -> 32 -> 16 LSTMs with a tied 16-d embedding, weight drop,
    every dropout, AR/TAR, weight decay, variable BPTT."""
    cfg = tiny_config(corpus, epochs=3, variable_bptt=True, ar_alpha=2.0, tar_beta=1.0, weight_decay=1e-6, **train)
    for knob, v in (("num_layers", 3), ("embedding_size", 16), ("hidden_size", 32), ("last_hidden_size", 16),
                    ("tie_weights", True), ("weight_drop", 0.3), ("dropout_embedding", 0.1), ("dropout_input", 0.2),
                    ("dropout_hidden", 0.2), ("dropout_output", 0.2)):
        setattr(cfg.model, knob, v)
    return cfg


MASKS = ["dropout", "dropout_embedding", "dropout_input", "dropout_hidden", "dropout_output", "weight_drop"]


def replayed_training_outputs(backend, knob: str, device: str, p: float = 0.3, replays: int = 4) -> list[Tensor]:
    """The AWD model's shape (16 -> 32 -> 32 -> 16, tied) with one regulariser (`knob`, probability p) on: its forward
    pass in training mode, recorded once by `backend` (wordlm.graphs.CudaGraphs or a stand-in) and replayed on
    one fixed batch with fixed weights. Each replay's logits (all 8 x 4 x 50 of them, not the mean loss: an
    untrained model's loss sits at ln 50 whatever the mask, and on an H100 two replays' fp32 losses once came out
    equal to the last bit). They differ only if the masks are drawn anew."""
    from wordlm.config import ModelConfig
    from wordlm.model import LSTMLanguageModel

    torch.manual_seed(0)
    cfg = ModelConfig(embedding_size=16, hidden_size=32, num_layers=3, last_hidden_size=16, tie_weights=True,
                      dropout=0.0)
    setattr(cfg, knob, p)
    model = LSTMLanguageModel(50, cfg).to(device).train()
    x = torch.randint(0, 50, (8, 4), device=device)
    logits = torch.zeros(8, 4, 50, device=device)

    def forward():
        with torch.no_grad():
            logits.copy_(model(x)[0])

    with backend.eager():
        forward()
    replay = backend.capture(forward)
    seen = []
    for _ in range(replays):
        replay()
        seen.append(logits.cpu().clone())
    return seen


def all_differ(tensors: list[Tensor]) -> bool:
    """True if no two of `tensors` are equal (as a whole)."""
    return not any(torch.equal(a, b) for i, a in enumerate(tensors) for b in tensors[i + 1:])


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """The demo config trained on the shipped corpus (a few seconds), shared by the tests that use a model."""
    from wordlm.config import load_config
    from wordlm.train import train

    out = tmp_path_factory.mktemp("runs") / "demo"
    cfg = load_config(ROOT / "configs" / "demo.toml", ["train.epochs=4"])
    train(cfg, out)
    return out
