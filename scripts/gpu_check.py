"""One-shot GPU check: what one H100/H200 tells about this project in a few minutes.

    scripts/gpu_check.sh [--cpu-smoke] [--steps 5] [--llm-layers K] [overrides ...]

Prints, through the production code (config loading, `build_qwenvl`, freezing, parallelize,
the generated DeepSpeed config, DeepSpeed's engine, the Trainer's loop and its throughput
meter; random weights, synthetic packed batches from data/synthetic.py, nothing
downloaded):
  (c) the stage-2 proxy: ViT-bigG/14 at 448 px + the adapter + a Qwen-7B-shaped LLM cut to
      as many decoder layers as the planner says fit this GPU, packed 2048-token rows,
      ZeRO-2 on one rank: step time, tokens/s, TFLOP/s and MFU (the project's formula,
      ViT FLOPs counted);
  (d) that run's peak memory against the planner's prediction (qwenvl-plan's model);
  (e) a short torch.profiler breakdown of two steps: attention, ViT, loss, optimizer step,
      data wait;
  (a) bf16 against fp32: the losses of a few steps of a 2-layer cut of the same model, same
      weights and batches;
  (b) the LLM attention backends (sdpa, eager, flash_attention_2 when flash_attn is
      installed, flex when this version offers it) on the same packed rows: loss and
      per-token losses against SDPA's.
Extra arguments are Hydra overrides for every run, e.g. `model.attn_implementation=flex
model.chunked_loss=true` (keys this version does not know are refused, naming them).
Without CUDA it stops with a message; `--cpu-smoke` runs the same code on the tiny model
on the CPU (for testing the script; its timings mean nothing).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import io
import itertools
import json
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from qwenvl_train.checks import ConfigError
from qwenvl_train.config import TrainConfig, load_config
from qwenvl_train.data.synthetic import synthetic_batch
from qwenvl_train.training.observe import plan
from qwenvl_train.training.observe.memory import (
    layout_from_config,
    memory_per_gpu,
    options_from_config,
)
from qwenvl_train.training.observe.tracking import ThroughputMeter, Tracker
from qwenvl_train.training.parallel.partition import images_per_row

GIB = 2**30
GPU_BASE = ["stage=multitask", "model=qwenvl_7b", "parallel=zero2", "tracking=none"]
CPU_BASE = ["stage=multitask", "model=tiny", "parallel=zero2", "tracking=none",
            "stage.seq_len=512", "stage.image_size=224"]
SMALL = ["model.vision.layers=2", "model.llm.num_layers=2"]  # for (a) and (b)
BACKENDS = ("sdpa", "eager", "flash_attention_2", "flex")
LABELS_PER_SAMPLE = 64  # a caption / answer after each image


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="run the same code on the tiny model on the CPU")
    ap.add_argument("--steps", type=int, default=5, help="timed steps of the proxy")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--llm-layers", type=int, default=None,
                    help="decoder layers of the proxy (default: as many as fit)")
    args, overrides = ap.parse_known_args(argv)
    if any(o.startswith("-") for o in overrides):
        ap.error(f"unknown option(s): {[o for o in overrides if o.startswith('-')]}")
    on_cuda = torch.cuda.is_available()
    if not on_cuda and not args.cpu_smoke:
        print(f"gpu_check: no CUDA device (torch {torch.__version__}, built for CUDA "
              f"{torch.version.cuda}; torch.cuda.is_available() is False). Run it on a "
              "machine with an H100/H200 and a CUDA build of torch, or pass --cpu-smoke to "
              "run the same code on a tiny model on the CPU.", file=sys.stderr)
        return 2
    base = (CPU_BASE if args.cpu_smoke else GPU_BASE) + overrides
    try:
        load_config(base)  # a bad override stops here, before anything is built
        Check(base, args, on_cuda and not args.cpu_smoke).run()
    except ConfigError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    return 0


class Check:
    def __init__(self, base: list[str], args: argparse.Namespace, on_cuda: bool) -> None:
        from qwenvl_train.training.parallel.engine import init_distributed

        self.base, self.args, self.on_cuda = base, args, on_cuda
        self.dist = init_distributed()  # a one-process group, as `qwenvl-train` makes
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu_check-"))
        self.quiet = io.StringIO()  # the trainer's progress lines; this script prints its own
        self.device_name = (torch.cuda.get_device_name(self.dist.device) if on_cuda
                            else "CPU")

    # -- set-up through the production code ----------------------------------------------
    def config(self, *extra: str, steps: int = 1) -> TrainConfig:
        cfg = load_config([*self.base, *extra, f"run_dir={self.tmp / 'run'}",
                           "stage.optim.warmup_steps=0", "stage.optim.schedule=constant",
                           "export_at_end=false", "checkpoint.every_steps=1000000"])
        cfg.stage.global_batch_size = cfg.stage.micro_batch_size  # one rank, no accumulation
        cfg.stage.steps = steps
        return cfg

    def batches(self, cfg: TrainConfig, count: int = 2) -> list[dict]:
        stage, q = cfg.stage, cfg.model.adapter.num_queries
        per_row = max(1, int(images_per_row(stage.seq_len, q, True)))
        return [synthetic_batch(stage.micro_batch_size, stage.seq_len, per_row, q,
                                stage.image_size, LABELS_PER_SAMPLE, seed=i)
                for i in range(count)]

    def trainer(self, cfg: TrainConfig, batches: list[dict]):
        """The engine and Trainer `qwenvl-train` builds (training/run.py:run), minus data
        loading and checkpoint writing."""
        from qwenvl_train.training import run
        from qwenvl_train.training.parallel.parallelize import parallelize
        from qwenvl_train.training.trainer import Trainer, TrainState

        class CheckTrainer(Trainer):
            def save(self) -> None:  # a check writes no checkpoints
                pass

        model = run.build_qwenvl(cfg)
        run.freeze(cfg, model)
        par = parallelize(model, cfg)
        engine = run.build_engine(cfg, par)
        del model
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.run_dir) / "metrics.jsonl").unlink(missing_ok=True)
        tracker = Tracker.create(cfg.tracking, cfg.run_dir, {}, self.dist.rank,
                                 total_steps=cfg.stage.steps, stream=self.quiet)
        meter = ThroughputMeter.create(cfg, dp_size=par.sizes.dp, device=self.dist.device)
        data = _marked(itertools.cycle(batches), "data wait")
        return CheckTrainer(cfg, self.dist, engine, par, None, data, tracker, meter, 1,
                            run.dummy_batch(cfg), TrainState())

    def metrics(self, cfg: TrainConfig) -> list[dict]:
        path = Path(cfg.run_dir) / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    def release(self, *objects) -> None:
        del objects
        gc.collect()
        if self.on_cuda:
            torch.cuda.empty_cache()

    # -- the sections --------------------------------------------------------------------
    def run(self) -> None:
        t0 = time.perf_counter()
        print(f"gpu_check on {self.device_name}; torch {torch.__version__}; overrides: "
              f"{' '.join(self.base)}", flush=True)
        self.proxy()
        self.precision()
        self.backends()
        print(f"\ndone in {time.perf_counter() - t0:.0f} s")

    def proxy(self) -> None:
        args = self.args
        layers = args.llm_layers or self.layers_that_fit()
        steps = args.warmup + args.steps + 2
        cfg = self.config(f"model.llm.num_layers={layers}", steps=steps)
        batches = self.batches(cfg)
        full = load_config(self.base).model.llm.num_layers
        why = ("as given" if args.llm_layers else
               "the most the planner fits here" if self.on_cuda else "the CPU smoke model")
        print(f"\n(c) stage-2 proxy: ViT {cfg.model.vision.layers} layers x width "
              f"{cfg.model.vision.width} at {cfg.stage.image_size} px + adapter + LLM "
              f"{layers} of {full} decoder layers (hidden {cfg.model.llm.hidden_size}; "
              f"{why}); "
              f"{cfg.stage.micro_batch_size} packed rows x {cfg.stage.seq_len} tokens, "
              f"{batches[0]['num_images']} images per micro-batch; ZeRO-"
              f"{cfg.parallel.zero_stage}, 1 rank; precision {cfg.stage.precision}", flush=True)
        trainer = self.trainer(cfg, batches)
        dtype = next(trainer.engine.module.parameters()).dtype
        cfg.stage.steps = args.warmup
        trainer.fit()
        if self.on_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        trainer.meter = ThroughputMeter.create(cfg, dp_size=1, device=self.dist.device,
                                               window=args.steps)
        cfg.stage.steps = args.warmup + args.steps
        trainer.fit()
        rows = self.metrics(cfg)[-args.steps:]
        last = rows[-1]
        step_time = statistics.median(r["perf/step_time_s"] for r in rows)
        mfu = last.get("perf/mfu")
        print(f"    parameters in {str(dtype).replace('torch.', '')}; step time {step_time:.3f} s "
              f"(median of {args.steps}); {last['perf/tokens_per_s']:,.0f} tokens/s; "
              f"{last.get('perf/tflops_per_device', 0):.1f} TFLOP/s; MFU "
              + (f"{mfu:.1%}" if mfu is not None else "n/a (no peak FLOP/s for this device)"),
              flush=True)
        self.memory(cfg, batches[0], last)
        self.profile(trainer, cfg, step_time)
        self.release(trainer)

    def layers_that_fit(self) -> int:
        """The most decoder layers whose planned peak fits this device (planner's margin);
        on the CPU the model's own."""
        cfg = self.config()
        full = cfg.model.llm.num_layers
        if not self.on_cuda:
            return full
        usable = torch.cuda.get_device_properties(self.dist.device).total_memory \
            * plan.USABLE_FRACTION
        batch = self.batches(cfg, 1)[0]

        def fits(layers: int) -> bool:
            cfg.model.llm.num_layers = layers
            return self.predicted(cfg, batch).peak <= usable

        if not fits(1):
            raise SystemExit("gpu_check: not even one decoder layer fits this GPU with the "
                             "ViT-bigG proxy; pass --llm-layers or a smaller micro-batch")
        lo, hi = 1, full + 1  # fits(lo); the peak grows with the layers
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    def predicted(self, cfg: TrainConfig, batch: dict):
        return memory_per_gpu(cfg.model, list(cfg.stage.trainable), cfg.stage.image_size,
                              plan.workload_of_batch(batch),
                              options_from_config(cfg, on_cuda=self.on_cuda),
                              layout_from_config(cfg, 1), accum=1, pack=cfg.stage.pack)

    def memory(self, cfg: TrainConfig, batch: dict, last: dict) -> None:
        m = self.predicted(cfg, batch)
        parts = ", ".join(f"{k} {getattr(m, k) / GIB:.2f}" for k in
                          ("params", "grads", "optimizer", "buffers", "activations",
                           "transient", "step_transient"))
        print(f"\n(d) peak memory: planner {m.peak / GIB:.2f} GiB ({parts} GiB)")
        if "mem/max_allocated_gib" in last:
            measured = last["mem/max_allocated_gib"]
            print(f"    measured torch.cuda.max_memory_allocated over the timed steps "
                  f"{measured:.2f} GiB (reserved {last['mem/max_reserved_gib']:.2f}); "
                  f"planner / measured = {m.peak / GIB / measured:.3f}")
        else:
            print(f"    measured: no allocator statistics on the CPU (peak RSS "
                  f"{last.get('mem/max_rss_gib', 0):.2f} GiB, whole process); the planner's "
                  "CPU check is tests/test_plan.py (MemTracker)")

    def profile(self, trainer, cfg: TrainConfig, step_time: float) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.on_cuda else [])
        steps = 2
        cfg.stage.steps += steps
        with _ranges(trainer), profile(activities=activities) as prof:
            trainer.fit()
            if self.on_cuda:
                torch.cuda.synchronize()
        times = breakdown(prof.events(), self.on_cuda)
        print(f"\n(e) profile of {steps} steps ({'GPU' if self.on_cuda else 'CPU'} time per "
              f"step; step time {step_time * 1000:.0f} ms; categories overlap: attention "
              "includes the ViT's):")
        for name, us in times.items():
            ms = us / 1000 / steps
            print(f"    {name:16s} {ms:9.1f} ms  {ms / (step_time * 1000):6.1%}")

    def precision(self) -> None:
        steps = 4
        print(f"\n(a) bf16 vs fp32: {steps} steps of a 2-layer cut (ViT and LLM), same "
              "weights and batches", flush=True)
        losses = {}
        for precision in ("fp32", "bf16"):
            cfg = self.config(*SMALL, f"stage.precision={precision}", steps=steps)
            trainer = self.trainer(cfg, self.batches(cfg))
            dtype = next(trainer.engine.module.parameters()).dtype
            trainer.fit()
            losses[precision] = ([r["loss"] for r in self.metrics(cfg)], dtype)
            self.release(trainer)
        (fp32, d32), (bf16, d16) = losses["fp32"], losses["bf16"]
        print(f"    parameters: {d32} / {d16}" + ("" if d16 == torch.bfloat16 else
              "  (this build trains bf16 on CUDA only: both ran in fp32)"))
        for i, (a, b) in enumerate(zip(fp32, bf16, strict=True), start=1):
            print(f"    step {i}: fp32 {a:.5f}  bf16 {b:.5f}  rel. diff {abs(b - a) / a:.2e}")

    def backends(self) -> None:
        from qwenvl_train.training import run

        print("\n(b) LLM attention backends on packed rows (forward, loss per token, "
              "against sdpa)", flush=True)
        cfg = self.config(*SMALL)
        dtype = torch.bfloat16 if self.on_cuda and cfg.stage.precision == "bf16" \
            else torch.float32
        batch = self.batches(cfg, 1)[0]
        inputs = {k: batch[k].to(self.dist.device) for k in
                  ("input_ids", "labels", "position_ids", "segment_ids", "images")}
        ref = None
        for backend in BACKENDS:
            why = _unavailable(backend, self.on_cuda)
            try:
                bcfg = self.config(*SMALL, f"model.attn_implementation={backend}")
            except ConfigError:
                why = why or "not offered by this version (model.attn_implementation)"
            if why:
                print(f"    {backend:18s} skipped: {why}")
                continue
            model = run.build_qwenvl(bcfg).to(self.dist.device, dtype).eval()
            with torch.no_grad():
                out = model(**inputs)
            self.release(model)
            if ref is None:
                ref = out
                print(f"    {backend:18s} loss {out.loss.item():.5f} ({str(dtype)[6:]})")
                continue
            diff = (out.token_loss - ref.token_loss).abs().max().item()
            print(f"    {backend:18s} loss {out.loss.item():.5f}  |loss diff| "
                  f"{abs(out.loss.item() - ref.loss.item()):.2e}  max |token loss diff| "
                  f"{diff:.2e}")


def _unavailable(backend: str, on_cuda: bool) -> str | None:
    if backend == "flash_attention_2":
        if not on_cuda:
            return "needs CUDA"
        if importlib.util.find_spec("flash_attn") is None:
            return "flash_attn is not installed"
    return None


def _marked(batches, name: str):
    """An iterator whose `next` runs inside a profiler range `name`."""
    from torch.profiler import record_function

    while True:
        with record_function(name):
            batch = next(batches)
        yield batch


@contextmanager
def _ranges(trainer):
    """Profiler ranges for the parts no op name identifies: the ViT (forward by module
    hooks, backward from its output's gradient to its first parameter's) and the optimizer
    step (DeepSpeed's engine.step)."""
    from torch.profiler import record_function

    engine = trainer.engine
    vit = _find(engine.module, "vit")
    open_ranges: dict[str, record_function] = {}

    def begin(name: str) -> None:
        open_ranges[name] = record_function(name).__enter__()

    def end(name: str) -> None:
        rf = open_ranges.pop(name, None)
        if rf is not None:
            rf.__exit__(None, None, None)

    def forward_hook(module, inputs, output):
        end("ViT forward")
        if output.requires_grad:
            output.register_hook(lambda grad: begin("ViT backward"))
        return output

    first = next(p for p in vit.parameters())
    handles = [vit.register_forward_pre_hook(lambda m, i: begin("ViT forward")),
               vit.register_forward_hook(forward_hook)]
    if first.requires_grad:
        handles.append(first.register_post_accumulate_grad_hook(
            lambda p: end("ViT backward")))
    step = engine.step

    def marked_step(*a, **k):
        with record_function("optimizer step"):
            return step(*a, **k)

    engine.step = marked_step
    try:
        yield
    finally:
        engine.step = step
        for h in handles:
            h.remove()


def _find(module: torch.nn.Module, name: str) -> torch.nn.Module:
    for path, sub in module.named_modules():
        if path.rsplit(".", 1)[-1] == name:
            return sub
    raise KeyError(name)


CATEGORIES = {  # op-name fragments (lower case) -> category
    "attention": ("attention", "flash", "fmha", "sdpa", "flex"),
    "loss (CE)": ("cross_entropy", "log_softmax", "nll_loss", "logsumexp"),
}
RANGES = ("ViT forward", "ViT backward", "optimizer step", "data wait")


def breakdown(events, on_cuda: bool) -> dict[str, float]:
    """Microseconds per category: the profiler ranges, and ops by name, each op counted
    once (not again under a matching parent)."""
    def cost(e) -> float:  # a range's GPU time where the profiler has it, else host time
        return e.device_time_total if on_cuda and e.device_time_total > 0 else e.cpu_time_total

    def category(name: str) -> str | None:
        low = name.lower()
        return next((c for c, keys in CATEGORIES.items() if any(k in low for k in keys)),
                    None)

    out = dict.fromkeys([*CATEGORIES, *RANGES], 0.0)
    for e in events:
        if e.name in RANGES:
            out[e.name] += cost(e)
            continue
        cat = category(e.name)
        if cat is None:
            continue
        parent = e.cpu_parent
        while parent is not None and category(parent.name) != cat:
            parent = parent.cpu_parent
        if parent is None:
            out[cat] += cost(e)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
