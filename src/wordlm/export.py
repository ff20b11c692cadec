"""Export a trained model as a standalone next-token step that runs with torch alone (no wordlm).

    wordlm export runs/demo --out demo.pt2

    # elsewhere, with only torch installed:
    files = {"tokenizer.json": "", "wordlm.json": ""}
    step = torch.export.load("demo.pt2", extra_files=files).module()
    meta = json.loads(files["wordlm.json"])            # eos_id, num_layers, h_size, c_size, ...
    h, c = torch.zeros(meta["num_layers"], 1, meta["h_size"]), torch.zeros(meta["num_layers"], 1, meta["c_size"])
    logprobs, h, c = step(torch.tensor([[meta["eos_id"]]]), h, c)   # ids (1, B) -> (B, V) log-probabilities

The graph is captured with `torch.export` (the successor of TorchScript) for one time step and any batch size;
the tokenizer travels inside the file as JSON.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import UsageError, check_out_file


class NextTokenStep(nn.Module):
    """ids (1, B), h (L, B, h_size), c (L, B, c_size) -> next-token log-probabilities (B, V), h, c."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits, (h, c) = self.model(ids, (h, c))
        return logits[0].float().log_softmax(-1), h, c


def export_model(lm, out: str | Path) -> Path:
    """Write `lm` (a wordlm.api.LanguageModel) to `out` as a torch.export program with its tokenizer."""
    out = Path(out)
    check_out_file(out, "model.pt2")
    cfg = lm.config.model
    model = lm.model.float().cpu().eval()
    step = NextTokenStep(model).eval()
    h, c = model.init_state(2)  # the state's widths: hidden_size, or proj_size / a narrower last layer for h
    example = (torch.zeros(1, 2, dtype=torch.long), h, c)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with torch.no_grad(), warnings.catch_warnings():
        # nn.LSTM re-assigns its flat weight list while traced; harmless, the weights are captured as parameters.
        warnings.filterwarnings("ignore", message=".*_flat_weights.*")
        program = torch.export.export(step, example, dynamic_shapes=({1: batch}, {1: batch}, {1: batch}))
    meta = {"format": "wordlm-next-token-step", "version": 1, "eos_id": lm.tokenizer.eos_id,
            "unk_id": lm.tokenizer.unk_id, "vocab_size": lm.tokenizer.vocab_size, "num_layers": cfg.num_layers,
            "hidden_size": cfg.hidden_size, "h_size": h.shape[-1], "c_size": c.shape[-1],
            "inputs": "ids (1, B) int64, h (num_layers, B, h_size), c (num_layers, B, c_size)",
            "outputs": "log-probabilities (B, vocab_size), h, c"}
    tmp = out.with_name(f".tmp-{out.name}")  # torch.export wants the .pt2 ending; renamed when complete
    try:
        torch.export.save(program, tmp, extra_files={"tokenizer.json": json.dumps(lm.tokenizer.to_state()),
                                                     "wordlm.json": json.dumps(meta)})
        tmp.replace(out)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        # torch's file writer reports I/O failures (no permission, a full disk) as RuntimeError
        if isinstance(e, RuntimeError) and not any(w in str(e).lower() for w in ("file", "directory", "write")):
            raise
        raise UsageError(f"--out {out}: cannot write the file ({e}); write it elsewhere") from None
    return out
