"""What a run's metrics.jsonl says: a summary, the time to a target perplexity, and the training curves as a PNG
(matplotlib is an optional extra: pip install 'wordlm[plot]')."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .errors import UsageError, check_out_file

log = logging.getLogger("wordlm")


def read_metrics(run: Path) -> list[dict]:
    """The records of RUN/metrics.jsonl. A line that is not a whole JSON record is skipped: the last line may
    be one that training is writing right now, or one a killed run left half-written (a warning says so when
    such a line is not the last)."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise UsageError(f"{path} does not exist; give a run directory that `wordlm train` wrote")
    lines = [(i, ln) for i, ln in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
             if ln.strip()]
    records = []
    for i, ln in lines:
        try:
            rec = json.loads(ln)
        except ValueError:
            rec = None
        if isinstance(rec, dict):
            records.append(rec)
        elif i != lines[-1][0]:
            log.warning("warning: %s line %d is not a JSON record; skipped", path, i)
    return records


def summarize(run: str | Path, target_ppl: float | None = None) -> dict:
    """Steps, tokens, wall time and the best validation of a run; {} when it has no validation yet. With
    `target_ppl`, also when validation perplexity first reached it: {"target": {"ppl", "reached", and, when
    reached, "elapsed_s", "step", "epoch", "tokens", "valid_ppl"}} (the time is the training loop's own clock,
    validation and checkpoints included). "valid_s_total": the time the validation passes took, and
    "peak_mem_mb" the most memory held, where recorded."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        return {}
    recs = read_metrics(run)
    valid = [r for r in recs if r.get("event") == "valid"]
    if not valid:
        return {}
    best = min(valid, key=lambda r: r["valid_loss"])
    out = {"steps": recs[-1]["step"], "tokens": recs[-1].get("tokens", 0),
           "elapsed_s": max(r.get("elapsed_s", 0) for r in recs), "validations": len(valid),
           "best_valid_ppl": best["valid_ppl"], "best_step": best["step"]}
    timed = [r["valid_s"] for r in valid if "valid_s" in r]  # runs before valid_s was recorded have none
    if timed:
        out["valid_s_total"] = round(sum(timed), 3)
    mem = [r["peak_mem_mb"] for r in recs if "peak_mem_mb" in r]  # nor did they record peak_mem_mb
    if mem:
        out["peak_mem_mb"] = max(mem)
    if target_ppl is not None:
        hit = next((r for r in valid if r["valid_ppl"] <= target_ppl), None)
        out["target"] = {"ppl": target_ppl, "reached": hit is not None}
        if hit is not None:
            out["target"].update({k: hit.get(k) for k in ("elapsed_s", "step", "epoch", "tokens", "valid_ppl")})
    return out


def plot_run(run: str | Path, out: str | Path | None = None) -> Path:
    """Loss against tokens seen and perplexity against wall time, train and validation, in one PNG."""
    run = Path(run)
    recs = read_metrics(run)
    out = Path(out) if out else run / "curves.png"
    check_out_file(out, "curves.png")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("wordlm plot needs matplotlib: pip install 'wordlm[plot]' (or pip install matplotlib)") \
            from None
    tr = [r for r in recs if r.get("event") == "train"]
    va = [r for r in recs if r.get("event") == "valid"]
    if not tr and not va:
        raise UsageError(f"{run / 'metrics.jsonl'} has no train or valid records yet")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    kind = out.suffix[1:].lower()
    if kind and kind not in fig.canvas.get_supported_filetypes():
        plt.close(fig)
        raise UsageError(f"--out {out}: matplotlib cannot write .{kind} files; end the name in .png, .svg or .pdf")
    if tr:
        ax1.plot([r["tokens"] for r in tr], [r["loss"] for r in tr], label="train", lw=1.2)
        ax2.plot([r["elapsed_s"] for r in tr], [r["ppl"] for r in tr], label="train", lw=1.2)
    if va:
        ax1.plot([r["tokens"] for r in va], [r["valid_loss"] for r in va], "o-", label="valid", lw=1.5)
        ax2.plot([r["elapsed_s"] for r in va], [r["valid_ppl"] for r in va], "o-", label="valid", lw=1.5)
    ax1.set(xlabel="tokens seen", ylabel="loss (nats/token)", title="loss")
    ax2.set(xlabel="wall time (s)", ylabel="perplexity", title="perplexity", yscale="log")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(str(run))
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
