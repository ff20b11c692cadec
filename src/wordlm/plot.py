"""What a run's metrics.jsonl says: a summary, the time to a target perplexity, and the training curves as a PNG
(matplotlib is an optional extra: pip install 'wordlm[plot]')."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from .errors import UsageError, check_out_file

log = logging.getLogger("wordlm")


# The fields `summarize`, `curves` and `wordlm plot` read from each kind of record, all numbers; every record
# has a step. A record of another kind is kept as long as it has one.
_NEEDS = {"train": ("step", "tokens", "loss", "ppl", "elapsed_s"),
          "valid": ("step", "tokens", "valid_loss", "valid_ppl", "elapsed_s")}


def _problem(rec: object) -> str | None:
    """Why a parsed line is not a record these readers can use, or None."""
    if not isinstance(rec, dict):
        return "not a JSON record"
    event = rec.get("event")
    for key in _NEEDS.get(event, ("step",)):
        v = rec.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            kind = f"a {event} record" if isinstance(event, str) and event else "a record"
            return f"{kind} without a number for {key!r}"
    return None


def metrics_file(run: str | Path) -> Path:
    """RUN/metrics.jsonl, or RUN itself when it is a .jsonl file (a curve kept apart from its run, as in
    docs/results/)."""
    run = Path(run)
    return run if run.suffix == ".jsonl" and not run.is_dir() else run / "metrics.jsonl"


def read_metrics(run: Path) -> list[dict]:
    """The records of RUN/metrics.jsonl (or of the .jsonl file RUN). A line that is not a whole JSON record, or a
    record without the numbers these readers use, is skipped: the last line may be one that training is writing
    right now, or one a killed run left half-written; anywhere else one warning counts them and names the first
    (a file edited by hand, or not one that wordlm wrote)."""
    path = metrics_file(run)
    if not path.is_file():
        raise UsageError(f"{path} does not exist; give a run directory that `wordlm train` wrote, or its "
                         f"metrics.jsonl")
    lines = [(i, ln) for i, ln in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
             if ln.strip()]
    records, skipped = [], []
    for i, ln in lines:
        try:
            rec = json.loads(ln)
        except ValueError:
            rec = None
        problem = _problem(rec)
        if problem is None:
            records.append(rec)
        elif i != lines[-1][0]:
            skipped.append((i, problem))
    if skipped:
        i, problem = skipped[0]
        log.warning("warning: %s: %d line%s skipped (line %d: %s); is it a metrics.jsonl that wordlm train wrote?",
                    path, len(skipped), "s" * (len(skipped) != 1), i, problem)
    return records


def summarize(run: str | Path, target_ppl: float | None = None) -> dict:
    """Steps, tokens, wall time and the best validation of a run; {} when it has no validation yet. With
    `target_ppl`, also when validation perplexity first reached it: {"target": {"ppl", "reached", and, when
    reached, "elapsed_s", "step", "epoch", "tokens", "valid_ppl"}} (the time is the training loop's own clock,
    validation and checkpoints included). "valid_s_total": the time the validation passes took, and
    "peak_mem_mb" the most memory held, where recorded; "averaging": where NT-ASGD's average began (step, epoch,
    trigger), if it did."""
    if not metrics_file(run).is_file():
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
    switch = next((r for r in recs if r.get("event") == "averaging"), None)
    if switch is not None:  # NT-ASGD: when the average began, and why
        out["averaging"] = {k: switch.get(k) for k in ("step", "epoch", "trigger")}
    if target_ppl is not None:
        hit = next((r for r in valid if r["valid_ppl"] <= target_ppl), None)
        out["target"] = {"ppl": target_ppl, "reached": hit is not None}
        if hit is not None:
            out["target"].update({k: hit.get(k) for k in ("elapsed_s", "step", "epoch", "tokens", "valid_ppl")})
    return out


def curves(recs: list[dict]) -> dict:
    """What `plot_run` draws, from a run's records: {"loss": {label: (tokens, values)}, "ppl": {label:
    (seconds, values)}, "averaging": (tokens, seconds) or None}. An NT-ASGD run's validations read the average
    once it starts; the trained weights' own perplexity beside it is the "valid, raw iterate" curve, and
    "averaging" is where the average began."""
    tr = [r for r in recs if r.get("event") == "train"]
    va = [r for r in recs if r.get("event") == "valid"]
    loss, ppl = {}, {}
    if tr:
        loss["train"] = ([r["tokens"] for r in tr], [r["loss"] for r in tr])
        ppl["train"] = ([r["elapsed_s"] for r in tr], [r["ppl"] for r in tr])
    if va:
        loss["valid"] = ([r["tokens"] for r in va], [r["valid_loss"] for r in va])
        ppl["valid"] = ([r["elapsed_s"] for r in va], [r["valid_ppl"] for r in va])
    raw = [r for r in va if "raw_valid_ppl" in r]
    if raw:
        loss["valid, raw iterate"] = ([r["tokens"] for r in raw], [math.log(r["raw_valid_ppl"]) for r in raw])
        ppl["valid, raw iterate"] = ([r["elapsed_s"] for r in raw], [r["raw_valid_ppl"] for r in raw])
    averaging = None
    switch = next((r for r in recs if r.get("event") == "averaging"), None)
    if switch is not None:  # its record has a step; the first record at or after it says when that was
        at = next((r for r in tr + va if r["step"] >= switch["step"] and "tokens" in r and "elapsed_s" in r), None)
        if at is not None:
            averaging = (at["tokens"], at["elapsed_s"])
    return {"loss": loss, "ppl": ppl, "averaging": averaging}


def plot_run(run: str | Path, out: str | Path | None = None) -> Path:
    """Loss against tokens seen and perplexity against wall time, train and validation, in one PNG (with an
    NT-ASGD run's raw iterate and the start of its average, where the run has them)."""
    run = Path(run)
    recs = read_metrics(run)
    if out is None:  # RUN/curves.png; beside a curve file, its name: X.metrics.jsonl -> X.png
        name = metrics_file(run).name
        out = run / "curves.png" if name == "metrics.jsonl" else run.with_name(name.removesuffix(".jsonl")
                                                                                .removesuffix(".metrics") + ".png")
    out = Path(out)
    check_out_file(out, "curves.png")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("wordlm plot needs matplotlib: pip install 'wordlm[plot]' (or pip install matplotlib)") \
            from None
    drawn = curves(recs)
    if not drawn["loss"]:
        raise UsageError(f"{metrics_file(run)} has no train or valid records yet")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    kind = out.suffix[1:].lower()
    if kind and kind not in fig.canvas.get_supported_filetypes():
        plt.close(fig)
        raise UsageError(f"--out {out}: matplotlib cannot write .{kind} files; end the name in .png, .svg or .pdf")
    style = {"train": {"lw": 1.2}, "valid, raw iterate": {"lw": 1.2, "ls": "--"}}
    for ax, series in ((ax1, drawn["loss"]), (ax2, drawn["ppl"])):
        for label, (x, y) in series.items():
            kw = style.get(label) or {"lw": 1.5, "marker": "o" if len(x) <= 40 else None, "ms": 4}
            ax.plot(x, y, label=label, **kw)
    if drawn["averaging"] is not None:
        for ax, x in zip((ax1, ax2), drawn["averaging"], strict=True):
            ax.axvline(x, color="grey", ls=":", lw=1.2, label="averaging from here")
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
