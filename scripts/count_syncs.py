"""Count the device-to-host syncs and collectives of one training step, by call site.

    PYTHONPATH=. python scripts/count_syncs.py [--steps 4] [overrides ...]

Runs the real trainer in this process (one rank, the demo data, `stage=sft` by default;
Hydra overrides as arguments) and, from step 2 on, records every operation that makes the
host wait for the device on an accelerator:
  * `aten._local_scalar_dense` (what `.item()`, `float(t)`, `int(t)`, `bool(t)` run),
  * `Tensor.tolist()` (a device-to-host copy; it bypasses the dispatcher, so it is patched),
  * data-dependent shapes: `aten.nonzero`, `aten.masked_select`, boolean-mask indexing
    (`aten.index.Tensor` with a bool index), `aten.unique*`, `aten.repeat_interleave`,
and every `torch.distributed` collective. Each event is attributed to the innermost frame
of our code (`qwenvl_train/`), else of DeepSpeed / transformers. Events in our code that
read the loader's batch (host tensors on a GPU machine too) are listed as `host`, not
counted as syncs; `cpu-only` marks checks that read a value only for CPU tensors (an
async device assertion on CUDA). `torch.optim` events are AdamW's step counters, host
tensors for the multi-tensor kernel (no device sync on a GPU). On this CPU machine
nothing really waits; the count is what a CUDA step would do. Run it against another
checkout (e.g. the main branch) with that checkout's PYTHONPATH to compare before / after.
"""

from __future__ import annotations

import argparse
import collections
import sys
import traceback

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique",
            "_unique2", "unique_dim", "unique_consecutive", "repeat_interleave"}
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor",
               "reduce_scatter", "reduce_scatter_tensor", "barrier", "all_to_all_single",
               "reduce", "all_gather_object", "broadcast_object_list")
# Read the loader's CPU batch, or the StepResult's host values.
HOST_SITES = ("_counts", "_segment_sq_tokens", "_log")
# Checks that read a value only for CPU tensors (on CUDA: an async device assertion).
CPU_ONLY_SITES = ("embed_inputs",)


def _site() -> str:
    """`package:function (file:line)` of the innermost frame outside torch."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        path = frame.filename
        if "/torch/optim/" in path:  # the optimizer's own step (e.g. AdamW's step counters)
            return f"torch.optim:{frame.name} ({path.split('/torch/', 1)[1]}:{frame.lineno})"
        for package in ("qwenvl_train", "deepspeed", "transformers"):
            if f"/{package}/" in path and "count_syncs" not in path:
                short = path.split(f"/{package}/", 1)[1]
                return f"{package}:{frame.name} ({short}:{frame.lineno})"
    return "other"


class Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str]] = []

    def add(self, kind: str) -> None:
        self.events.append((kind, _site()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in SYNC_OPS:
            self.add(name)
        elif name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                     for i in (args[1] if len(args) > 1 else ()) or ()):
            self.add("bool-index")
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    args, overrides = parser.parse_known_args()
    from bench_common import demo_config

    from qwenvl_train.training import run as run_mod
    from qwenvl_train.training.trainer import Trainer

    cfg = demo_config(["stage=sft", f"stage.steps={args.steps}", "stage.optim.warmup_steps=1",
                       "checkpoint.every_steps=1000", "export_at_end=false"], overrides,
                      "count_syncs_")
    recorder = Recorder()
    marks: list[int] = []

    original_tolist = torch.Tensor.tolist

    def tolist(self):
        recorder.add("tolist")
        return original_tolist(self)

    def counted(name, fn):
        def wrapper(*a, **k):
            recorder.add(f"collective:{name}")
            return fn(*a, **k)
        return wrapper

    original_log, original_fit = Trainer._log, Trainer.fit

    def log(self, result):
        marks.append(len(recorder.events))  # a step ends when it is logged
        return original_log(self, result)

    def fit(self):
        torch.Tensor.tolist = tolist
        saved = {n: getattr(dist, n) for n in COLLECTIVES if hasattr(dist, n)}
        for n, fn in saved.items():
            setattr(dist, n, counted(n, fn))
        try:
            with recorder:
                return original_fit(self)
        finally:
            torch.Tensor.tolist = original_tolist
            for n, fn in saved.items():
                setattr(dist, n, fn)

    Trainer._log, Trainer.fit = log, fit
    run_mod.run(cfg)
    steps = len(marks) - 1
    per_step = collections.Counter(recorder.events[marks[0]:marks[-1]])
    print(f"\n{cfg.stage.name}, {cfg.stage.global_batch_size // cfg.stage.micro_batch_size} "
          f"micro-batches per step, zero_stage {cfg.parallel.zero_stage}; per step over "
          f"steps 2..{steps + 1}:")
    totals = collections.Counter()
    for (kind, site), n in sorted(per_step.items(), key=lambda kv: kv[0][1]):
        cls = ("collective" if kind.startswith("collective") else
               "host" if any(f":{h} " in site for h in HOST_SITES) else
               "cpu-only" if any(f":{h} " in site for h in CPU_ONLY_SITES) else "sync")
        owner = site.split(":", 1)[0]
        totals[(cls, owner)] += n / steps
        print(f"  {n / steps:6.2f}  {cls:10s} {kind:32s} {site}")
    print("totals per step:")
    for (cls, owner), n in sorted(totals.items()):
        print(f"  {cls:10s} {owner:12s} {n:6.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
