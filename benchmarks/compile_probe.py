"""Eager against torch.compile for the bench-ptb model's training step (random ids).

    python benchmarks/compile_probe.py
"""

import time
from pathlib import Path

import torch

from wordlm.config import load_config
from wordlm.model import build_model

cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "bench-ptb.toml")
model = build_model(cfg.model, 10000)
opt = torch.optim.SGD(model.parameters(), lr=1, fused=True)
x = torch.randint(0, 10000, (35, 20))
y = torch.randint(0, 10000, (35, 20))


def step(fwd) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nll, _ = fwd(x, None, y)
    loss = nll.mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


for name, fwd in (("eager", model), ("compiled", torch.compile(model))):
    t = time.perf_counter()
    step(fwd)
    print(f"{name}: first step {time.perf_counter() - t:.1f} s", flush=True)
    for _ in range(3):
        step(fwd)
    t = time.perf_counter()
    for _ in range(20):
        step(fwd)
    print(f"{name}: {20 * 700 / (time.perf_counter() - t):,.0f} tokens/s", flush=True)
