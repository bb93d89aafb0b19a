"""A user script for `trellis launch|submit SCRIPT.py`: joins the job through trellis' rank-environment
detection, all-reduces (rank + 1) over gloo and writes what it saw to OUT/rank-N.json."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from trellis.engine.distributed import init_distributed, shutdown
from trellis.engine.run import end_rank_process

out = Path(sys.argv[sys.argv.index("--out") + 1])
ctx = init_distributed(timeout_s=120)
t = torch.tensor([float(ctx.rank + 1)])
dist.all_reduce(t)
(out / f"rank-{ctx.rank}.json").write_text(json.dumps({"rank": ctx.rank, "world": ctx.world_size,
                                                        "source": ctx.launcher, "sum": t.item(),
                                                        "argv": sys.argv[1:]}))
shutdown(clean=True, destroy=False)
end_rank_process(0)  # skips gloo teardown at interpreter exit, as trellis' own ranks do (engine/run.py)
