"""wordlm: next-word LSTM language models, from text to checkpoints to predictions.

    from wordlm import load
    lm = load("runs/demo")
    lm.score(["why do we need a recurrent neural network"])
"""

__version__ = "0.1.0"


def load(path, device: str = "cpu"):
    """Load a trained model (a run directory or a checkpoint directory) as a `LanguageModel`."""
    from .api import LanguageModel

    return LanguageModel.load(path, device=device)


__all__ = ["__version__", "load"]
