"""Tokenize and cache a corpus larger than a user would keep in memory, and report peak resident memory.

    python scripts/scale_check.py --gb 1 --dir /tmp/wordlm-scale

Writes a generated text of about --gb gigabytes (lines of words drawn from a 30,000-word Zipf vocabulary),
then, each in a fresh process: (1) fits the word tokenizer and encodes + caches the file; (2) loads the cache
again. Prints the time and the peak RSS of each process (ru_maxrss of the child), which is what docs/PERFORMANCE.md
quotes. The text goes to --dir (never into the project).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import json, resource, sys, time
from wordlm.data import encode_file, iter_lines
from wordlm.tokenizer import WordTokenizer
path, cache, phase = sys.argv[1], sys.argv[2], sys.argv[3]
t0 = time.perf_counter()
if phase == "encode":
    tok = WordTokenizer.fit(iter_lines(path, progress=True))
    (__import__("pathlib").Path(cache) / "tok.json").write_text(json.dumps(tok.to_state()))
else:
    from wordlm.tokenizer import tokenizer_from_state
    tok = tokenizer_from_state(json.loads((__import__("pathlib").Path(cache) / "tok.json").read_text()))
t_fit = time.perf_counter() - t0
split = encode_file(path, tok, cache, progress=(phase == "encode"))
total = int(split.ids[-1]) + split.tokens  # touch the array
print(json.dumps({"phase": phase, "fit_s": t_fit, "seconds": time.perf_counter() - t0, "tokens": split.tokens,
                  "vocab": tok.vocab_size, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_text(path: Path, gigabytes: float) -> None:
    rng = random.Random(0)
    words = [f"w{i}" for i in range(30000)]
    weights = [1 / (i + 1) for i in range(30000)]  # Zipf-like frequencies, as in real text
    pool = [" ".join(rng.choices(words, weights, k=rng.randint(5, 30))) for _ in range(20000)]
    target = int(gigabytes * 1e9)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            rng.shuffle(pool)
            chunk = "\n".join(pool) + "\n"
            f.write(chunk)
            written += len(chunk)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/wordlm-scale"))
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    text, cache = args.dir / "big.txt", args.dir / "cache"
    if not text.exists() or abs(text.stat().st_size - args.gb * 1e9) > 0.05e9:
        t0 = time.perf_counter()
        make_text(text, args.gb)
        print(f"wrote {text} ({text.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f}s")
    cache.mkdir(exist_ok=True)
    for f in cache.iterdir():
        f.unlink()
    for phase in ("encode", "load"):
        out = subprocess.run([sys.executable, "-c", CHILD, str(text), str(cache), phase], capture_output=True,
                             text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{phase:>6}: {r['seconds']:7.1f} s  ({r['tokens']:,} tokens, vocabulary {r['vocab']:,}), "
              f"peak RSS {r['peak_rss_mb']:.0f} MB")
    print(f"parent peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
