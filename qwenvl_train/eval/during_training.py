"""Evaluation during training: a built-in trainer callback (`Evaluator`) driven by the
`eval` config (eval/config.py; the task table is eval/tasks.py).

After step `eval.every_steps`, 2 x that, ... and after the last step (`on_step_end`, before
that step's checkpoint), every rank takes part in one evaluation of each task:

* validation loss: the task's held-out records rendered by the stage's own template,
  teacher-forced through the training forward and loss. Pipeline-free layouts (ZeRO 0-3,
  tensor parallel) run it on every rank through the DeepSpeed engine, each data-parallel
  replica on its share of the records in unpacked micro-batches of the stage's size (ranks
  short of a batch run the trainer's dummy batch, so ZeRO-3's gathers pair up), and sum
  (loss, tokens) over replicas.
* generation metrics (eval/run_eval.py): where every rank holds the full weights (ZeRO 0-2
  without tensor or pipeline parallelism) each replica answers its share of the items and
  rank 0 gathers the rows; otherwise (ZeRO-3, tensor or pipeline parallel) the weights are
  first gathered to rank 0 (`Parallel.full_state_dict`, the export's gather) into a plain
  copy of the model that answers every item.
* pipeline layouts: that gathered copy on rank 0 also computes the validation loss (the
  same `QwenVL.forward` and loss the pipeline stages split between them). The other ranks
  wait in a broadcast of rank 0's outcome; an error on rank 0 reaches them there and every
  rank stops with it. The wait is bounded by the process-group timeout (DeepSpeed's
  default: 30 minutes), so keep `eval.max_items` to what rank 0 evaluates well within it.

Training is not changed: no gradients, the model goes back to train mode, and the Python,
NumPy and torch RNG states are restored, so a run's losses are bitwise the same with
evaluation on. Rank 0 appends the results to `run_dir/eval.jsonl`, prints one line per task,
logs `eval/<task>/<metric>` and a table of `eval.table_rows` samples per task to W&B, and
adds the numbers to the step's metrics (the last evaluation lands in summary.json).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from qwenvl_train.config import TrainConfig
from qwenvl_train.data.encode import EncodedSample, encode_tokens, to_encoded
from qwenvl_train.data.images import decode_images
from qwenvl_train.data.packing import collate
from qwenvl_train.data.records import Record
from qwenvl_train.data.templates import ACCEPTS
from qwenvl_train.data.tokenizer import get_tokenizer
from qwenvl_train.eval.items import Item, iter_items, iter_records
from qwenvl_train.eval.run_eval import generate_rows, resolve_shards, summarize
from qwenvl_train.eval.samples import table_rows
from qwenvl_train.eval.tasks import RECORD_TASKS
from qwenvl_train.training import checkpoint as ckpt
from qwenvl_train.training.callbacks import TrainerCallback
from qwenvl_train.training.losses import task_loss_sums
from qwenvl_train.training.trainer import Trainer, _to_device

log = logging.getLogger("qwenvl_train")
EVAL_LOG = "eval.jsonl"
TABLE_COLUMNS = ("task", "key", "image", "prompt", "answer", "reference")


@dataclass
class TaskData:
    """One task's held-out data as this rank holds it (read once, at the first evaluation)."""

    items: list[Item] = field(default_factory=list)  # every rank: all items (image bytes)
    loss_samples: list[EncodedSample] = field(default_factory=list)  # what the template renders
    skipped: dict[str, int] = field(default_factory=dict)
    loss_note: str = ""  # why there is no validation loss


def builtin_callbacks(cfg: TrainConfig) -> list[TrainerCallback]:
    """The trainer callbacks the config itself asks for (evaluation when `eval.tasks`)."""
    return [Evaluator(cfg)] if cfg.eval.enabled else []


class Evaluator(TrainerCallback):
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg, self.ecfg = cfg, cfg.eval
        self.mode = cfg.eval.prompt_mode(cfg.stage.template)
        self.data: dict[str, TaskData] | None = None
        self._gathered_model = None  # rank 0's plain copy (gathered layouts), reused

    # -- the event -----------------------------------------------------------------------
    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        if step % self.ecfg.every_steps and step != self.cfg.stage.steps:
            return
        results = self.evaluate(trainer)
        if results is not None:  # rank 0
            self.report(trainer, step, results)
            metrics.update(results["metrics"])

    # -- one evaluation ------------------------------------------------------------------
    def evaluate(self, trainer: Trainer) -> dict[str, Any] | None:
        """Every rank calls this; rank 0 gets {"metrics", "tables"}, the others None."""
        t0 = time.perf_counter()
        rng = ckpt.rng_state()
        try:
            if self.data is None:
                self.data = self.read(loss_here=self.ecfg.loss and (
                    not trainer.par.is_pipeline or trainer.dist.rank == 0))
                for task, data in self.data.items():
                    if data.loss_note and trainer.dist.is_main:
                        log.info("eval %s: no validation loss: %s", task, data.loss_note)
            par = trainer.par
            sharded = not (par.is_pipeline or par.sizes.tp > 1
                           or self.cfg.parallel.zero_stage == 3)
            losses = {} if par.is_pipeline or not self.ecfg.loss else self._losses(trainer)
            rows: dict[str, list[dict]] = {}
            if self.ecfg.generate and sharded:
                rows = self._generate_sharded(trainer)
            elif self.ecfg.generate or (self.ecfg.loss and par.is_pipeline):
                rows, rank0_losses = self._on_rank0(trainer)
                losses = rank0_losses if par.is_pipeline else losses
        finally:
            ckpt.set_rng_state(rng)
        if trainer.dist.rank != 0:
            return None
        return self._results(losses, rows, time.perf_counter() - t0,
                             tables=trainer.tracker.run is not None)

    def read(self, loss_here: bool = True) -> dict[str, TaskData]:
        """Every task's items (bytes only) and, when `loss_here`, its records encoded for
        the validation loss; at most `max_items` each. Read once, at the first evaluation."""
        cfg, stage = self.cfg, self.cfg.stage
        root = self.ecfg.shard_root(cfg.data.root)
        tok = get_tokenizer()
        out = {}
        for task, pattern in self.ecfg.tasks.items():
            paths, data = resolve_shards(pattern, root), TaskData()
            for i, item in enumerate(iter_items(
                    paths, task, data.skipped, max_image_pixels=cfg.data.max_image_pixels,
                    mode=self.mode, chat_prompts=self.ecfg.generation.chat_prompts)):
                if i == self.ecfg.max_items:
                    break
                item.index = i
                data.items.append(item)
            rendered = [t for t in RECORD_TASKS[task] if t in ACCEPTS[stage.template]]
            if not rendered:
                data.loss_note = (f"the {stage.template} template renders none of its "
                                  f"records ({', '.join(RECORD_TASKS[task])})")
            elif loss_here:

                def encode(record: Record) -> list[EncodedSample]:
                    tokens = encode_tokens(record.sample, stage.template, tok,
                                           cfg.model.adapter.num_queries, stage.seq_len)
                    images = decode_images(record.sample, tokens.image_order,
                                           stage.image_size,
                                           max_pixels=cfg.data.max_image_pixels)
                    return [to_encoded(record.sample, tokens, images)]

                for i, sample in enumerate(iter_records(
                        paths, rendered, data.skipped, use=encode,
                        max_image_pixels=cfg.data.max_image_pixels)):
                    if i == self.ecfg.max_items:
                        break
                    data.loss_samples.append(sample)
            out[task] = data
        return out

    # -- validation loss -----------------------------------------------------------------
    def _batches(self, samples: list[EncodedSample], dp_rank: int, dp: int) -> list[dict]:
        stage, tok = self.cfg.stage, get_tokenizer()
        mine = samples[dp_rank::dp]
        mb = stage.micro_batch_size
        return [collate([[s] for s in mine[i:i + mb]], tok.pad_id, stage.image_size,
                        pad_to_multiple_of=self.cfg.data.pad_to_multiple_of,
                        max_len=stage.seq_len)
                for i in range(0, len(mine), mb)]

    @torch.no_grad()
    def _losses(self, trainer: Trainer) -> dict[str, torch.Tensor]:
        """(loss sum, tokens) per task over every replica, through the training engine."""
        par, engine, device = trainer.par, trainer.engine, trainer.dist.device
        dp, mb = par.sizes.dp, self.cfg.stage.micro_batch_size
        was_training = engine.training
        engine.eval()
        out = {}
        try:
            for task, data in self.data.items():
                if data.loss_note:
                    continue
                batches = self._batches(data.loss_samples, par.dp_rank, dp)
                # The same number of forwards on every rank (ZeRO-3 gathers pair up).
                rounds = math.ceil(math.ceil(len(data.loss_samples) / dp) / mb)
                sums = torch.zeros(2, dtype=torch.float64, device=device)
                for i in range(rounds):
                    batch = batches[i] if i < len(batches) else trainer.dummy_batch
                    inputs = _to_device(batch, device, trainer.param_dtype)
                    result = engine(**inputs)
                    if i < len(batches):
                        sums += task_loss_sums(result.token_loss, batch["task_ids"],
                                               inputs["labels"]).sum(0)
                dist.all_reduce(sums, group=par.dp_group)
                out[task] = sums
        finally:
            engine.train(was_training)
        return out

    @torch.no_grad()
    def plain_losses(self, model, device: torch.device, dtype: torch.dtype
                     ) -> dict[str, torch.Tensor]:
        """The same on one process with a plain model (rank 0, pipeline layouts)."""
        out = {}
        model.eval()
        for task, data in self.data.items():
            if data.loss_note:
                continue
            sums = torch.zeros(2, dtype=torch.float64, device=device)
            for batch in self._batches(data.loss_samples, 0, 1):
                inputs = _to_device(batch, device, dtype)
                result = model(**inputs)
                sums += task_loss_sums(result.token_loss, batch["task_ids"],
                                       inputs["labels"]).sum(0)
            out[task] = sums
        return out

    # -- generation ----------------------------------------------------------------------
    def _generate(self, model, task: str, items: list[Item]) -> list[dict]:
        gen = self.ecfg.generation
        return generate_rows(model, items, task, mode=self.mode, batch_size=gen.batch_size,
                             max_new_tokens=gen.max_new_tokens,
                             image_size=self.cfg.stage.image_size,
                             skipped=self.data[task].skipped)

    def _generate_sharded(self, trainer: Trainer) -> dict[str, list[dict]]:
        """Replicated weights: each replica answers items[dp_rank::dp]; rank 0 gathers."""
        par, out = trainer.par, {}
        for task, data in self.data.items():
            rows = self._generate(trainer.engine.module, task,
                                  data.items[par.dp_rank::par.sizes.dp])
            gathered: list | None = [None] * dist.get_world_size() if trainer.dist.is_main \
                else None
            dist.gather_object(rows, gathered, dst=0)
            if trainer.dist.is_main:
                out[task] = sorted((r for part in gathered for r in part),
                                   key=lambda r: r["index"])
        return out

    def _on_rank0(self, trainer: Trainer) -> tuple[dict[str, list[dict]], dict]:
        """Gather the weights to rank 0, evaluate there; the others wait for its outcome."""
        state = trainer.par.full_state_dict()  # collective; full tensors on rank 0
        rows, losses, error = {}, {}, ""
        if trainer.dist.is_main:
            try:
                model = self._rank0_model(state, trainer.dist.device, trainer.param_dtype)
                del state
                if self.ecfg.loss and trainer.par.is_pipeline:
                    losses = self.plain_losses(model, trainer.dist.device, trainer.param_dtype)
                if self.ecfg.generate:
                    rows = {task: self._generate(model, task, data.items)
                            for task, data in self.data.items()}
            except Exception as e:  # every rank must learn of it, not wait for rank 0
                error = f"{type(e).__name__}: {e}"
                log.exception("evaluation failed on rank 0")
        box = [error]
        dist.broadcast_object_list(box, src=0)
        if box[0]:
            raise RuntimeError(f"evaluation failed on rank 0: {box[0]}")
        return rows, losses

    def _rank0_model(self, state: dict[str, torch.Tensor], device: torch.device,
                     dtype: torch.dtype):
        """A plain QwenVL holding the gathered weights (built once, refilled each time); with
        LoRA on, the adapters merged into them as the export does."""
        from qwenvl_train.model.lora import merged_export

        state, plain_cfg = merged_export(state, self.cfg.model)
        if self._gathered_model is None:
            from qwenvl_train.model.qwenvl import build_model, restore_fp32_tables

            # Built under the restored RNG (evaluate() puts the state back afterwards).
            self._gathered_model = build_model(plain_cfg, self.cfg.stage.image_size)
            self._gathered_model.to(device=device, dtype=dtype)
            restore_fp32_tables(self._gathered_model)  # as in training: fp32 under bf16
        self._gathered_model.load_state_dict(state, strict=True)
        return self._gathered_model.eval()

    # -- results -------------------------------------------------------------------------
    def _results(self, losses: dict[str, torch.Tensor], rows: dict[str, list[dict]],
                 seconds: float, tables: bool) -> dict[str, Any]:
        """Rank 0: the metrics and, for W&B (`tables`), the drawn sample rows."""
        metrics: dict[str, float] = {}
        samples = []
        for task, data in self.data.items():
            prefix = f"eval/{task}/"
            if task in losses and float(losses[task][1]) > 0:
                metrics[prefix + "loss"] = float(losses[task][0] / losses[task][1])
            if task in rows:
                metrics.update({prefix + k: v for k, v in summarize(task, rows[task]).items()})
                metrics[prefix + "num_items"] = len(rows[task])
                if tables:
                    samples += table_rows(task, data.items, rows[task][:self.ecfg.table_rows])
            if data.skipped:
                metrics[prefix + "skipped"] = sum(data.skipped.values())
        metrics["eval/seconds"] = seconds
        return {"metrics": metrics, "tables": samples}

    def report(self, trainer: Trainer, step: int, results: dict[str, Any]) -> None:
        """Rank 0: eval.jsonl, a console line per task, W&B scalars and the samples table."""
        metrics = results["metrics"]
        with open(Path(self.cfg.run_dir) / EVAL_LOG, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for task in self.ecfg.tasks:
            prefix = f"eval/{task}/"
            shown = ", ".join(f"{k[len(prefix):]} {v:.4g}" for k, v in metrics.items()
                              if k.startswith(prefix))
            trainer.tracker.write(f"[eval step {step}] {task}: {shown or 'no items'}")
        payload: dict[str, Any] = dict(metrics)
        if results["tables"]:
            try:
                payload["eval/samples"] = _wandb_table(results["tables"])
            except Exception as exc:  # tracking never stops training
                log.warning("eval: W&B table not logged (%s: %s)", type(exc).__name__, exc)
        trainer.tracker.log_wandb(step, payload)


def _wandb_table(rows: list[dict[str, Any]]):
    import wandb

    table = wandb.Table(columns=list(TABLE_COLUMNS))
    for row in rows:
        table.add_data(*(wandb.Image(row[c]) if c == "image" else row[c]
                         for c in TABLE_COLUMNS))
    return table
