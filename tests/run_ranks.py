"""Run train.main once per JSON config given on the command line, in order, inside one torchrun launch: the tests'
multi-rank runs (uninterrupted, stopped, resumed) pay torchrun's start-up once. A run that stops on a non-finite loss
prints `rank R stopped: <message>` and ends the launch with exit code 3.

    torchrun --standalone --nproc_per_node=2 tests/run_ranks.py '{"out": "out/a", "fsdp": true}' '{"out": "out/b"}'
"""
import json
import os
import sys
from datetime import timedelta

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402

if __name__ == "__main__":
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))   # once: train.main uses it and leaves it open
    for arg in sys.argv[1:]:
        try:
            train.main(train.TrainConfig(**json.loads(arg)))
        except FloatingPointError as e:
            print(f"rank {os.environ.get('RANK')} stopped: {e}", flush=True)
            sys.exit(3)
    dist.destroy_process_group()
