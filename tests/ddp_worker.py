"""Run by tests/test_ddp.py under torchrun: train, then check that every rank holds the same weights."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from wordlm.config import load_config
from wordlm.train import train

config, out = sys.argv[1], Path(sys.argv[2])
dist.init_process_group("gloo")  # opened here, so train() uses it and leaves it open for the check below
result = train(load_config(config), out)
flat = torch.cat([p.detach().flatten() for p in result.model.parameters()])
gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, flat)
if dist.get_rank() == 0:
    same = all(torch.equal(gathered[0], g) for g in gathered[1:])
    (out / "ddp_check.json").write_text(json.dumps({"world": dist.get_world_size(), "same_weights": same,
                                                    "steps": result.steps, "tokens": result.tokens}))
dist.barrier()  # rank 0 is still writing: leave together
dist.destroy_process_group()
