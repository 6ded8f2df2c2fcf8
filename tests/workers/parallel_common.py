"""Shared by the parallel-layout tests and their torchrun worker: the tiny model, the fixed
batches, and the single-process reference loop the layouts must reproduce."""

from __future__ import annotations

import torch

from qwenvl_train.model.config import QwenVLConfig
from qwenvl_train.model.groups import GROUPS, set_trainable
from qwenvl_train.model.lora import apply_lora, lora_linears
from qwenvl_train.model.lora_config import LoRAConfig
from qwenvl_train.model.qwenvl import build_model
from qwenvl_train.training.optim import build_optimizer, build_param_groups

IMAGE_SIZE = 56
SEQ_LEN = 48
MICRO_BATCH = 2
ACCUM = 2
STEPS = 3
SEED = 1234
LR, CLIP = 1e-3, 1.0
IMG_START, IMG_END, IMG_PAD = 151857, 151858, 151859
OPTIM = dict(weight_decay=0.05, group_lr_scale={"vit": 1.0, "adapter": 2.0, "llm": 0.5},
             vit_layer_decay=0.9)
# LoRA on the tensor-parallel-split groups (ViT, LLM); the adapter trains fully.
LORA = LoRAConfig(enabled=True, rank=4, alpha=8.0, dropout=0.0, targets=["vit", "llm"])


def tiny_config(checkpointing: bool = False) -> QwenVLConfig:
    """kv_heads < heads (GQA) and every split dimension divisible by tp=2."""
    return QwenVLConfig.from_dict({
        "name": "parallel-test",
        "vision": {"patch_size": 14, "width": 32, "layers": 2, "heads": 4, "mlp_dim": 64,
                   "pos_grid": 16, "ln_eps": 1e-6},
        "adapter": {"num_queries": 4, "embed_dim": 32, "heads": 4},
        "llm": {"hidden_size": 32, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2,
                "intermediate_size": 64, "vocab_size": 151936,
                "max_position_embeddings": 256},
        "gradient_checkpointing": {"vit": checkpointing, "llm": checkpointing},
    })


def make_model(trainable=GROUPS, seed: int = SEED,
               checkpointing: bool = False, lora: bool = False):
    torch.manual_seed(seed)
    model = build_model(tiny_config(checkpointing), IMAGE_SIZE)
    if lora:
        apply_lora(model, LORA, seed=seed)  # what training.run.build_qwenvl does
        randomize_lora_b(model, seed)
    set_trainable(model, trainable, lora_parts=LORA.parts if lora else ())
    return model


@torch.no_grad()
def randomize_lora_b(model, seed: int) -> None:
    """Nonzero B (it starts at zero): A gets gradients and B's split matters from step 1."""
    gen = torch.Generator().manual_seed(seed)
    for module in lora_linears(model).values():
        module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=gen) * 0.1)


def _row(gen: torch.Generator, images: int, queries: int,
         length: int) -> tuple[list[int], list[int]]:
    """Two packed samples (the first with `images` images) + padding: ids and segments."""
    ids, seg = [], []
    for s, n_img in ((1, images), (2, 0)):
        sample = []
        for _ in range(n_img):
            sample += [IMG_START] + [IMG_PAD] * queries + [IMG_END]
        sample += torch.randint(0, 1000, (int(torch.randint(5, 12, (1,), generator=gen)),),
                                generator=gen).tolist()
        ids += sample
        seg += [s] * len(sample)
    pad = length - len(ids)
    return ids + [151643] * pad, seg + [0] * pad


def make_batch(step: int, dp_rank: int, micro: int, text_only: bool = False) -> dict:
    gen = torch.Generator().manual_seed(1000 * step + 100 * dp_rank + micro)
    queries = tiny_config().adapter.num_queries
    length = SEQ_LEN - 8 * (micro % 2)  # shapes change between micro-batches
    rows = [_row(gen, 0 if text_only else 1 + r % 2, queries, length)
            for r in range(MICRO_BATCH)]
    ids = torch.tensor([r[0] for r in rows])
    seg = torch.tensor([r[1] for r in rows])
    labels = ids.clone()
    labels[(ids == IMG_PAD) | (ids == IMG_START) | (seg == 0)] = -100
    pos = torch.zeros_like(ids)
    for b in range(ids.shape[0]):
        for s in seg[b].unique():
            where = (seg[b] == s).nonzero().squeeze(1)
            pos[b, where] = torch.arange(len(where))
    n_img = int((ids == IMG_PAD).sum()) // queries
    tasks = torch.where(seg == 0, -1, seg - 1)  # sample 1 -> task 0, sample 2 -> task 1
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "segment_ids": seg,
            "task_ids": tasks,
            "images": torch.randn(n_img, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen),
            "keys": [f"s{step}-r{dp_rank}-m{micro}-{b}" for b in range(MICRO_BATCH)],
            # the loader's counts, which the trainer's throughput meter reads
            "num_samples": 2 * MICRO_BATCH, "num_images": n_img,
            "num_real_tokens": int((seg > 0).sum())}


def step_batches(step: int, dp: int) -> list[list[dict]]:
    """[dp][micro] batches of a step; data-parallel rank 1 gets a text-only micro-batch."""
    return [[make_batch(step, r, m, text_only=(r == 1 and m == 0)) for m in range(ACCUM)]
            for r in range(dp)]


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "images", "labels", "position_ids",
                                  "segment_ids")}


def param_groups(model_like) -> list[dict]:
    """The trainer's optimizer groups (needs only `.named_parameters()`)."""
    groups, _ = build_param_groups(model_like, num_vit_layers=tiny_config().vision.layers, **OPTIM)
    return groups


@torch.no_grad()
def _clip(params: list[torch.Tensor]) -> float:
    """Clip to CLIP like torch's clip_grad_norm_, with the norm summed in fp64 (an fp32
    norm of the 4.9M-entry embedding gradient is off by ~5e-6 relative)."""
    norm = float(torch.stack([(p.grad.double() ** 2).sum() for p in params]).sum().sqrt())
    coef = min(1.0, CLIP / (norm + 1e-6))
    for p in params:
        p.grad.mul_(coef)
    return norm


def reference(dp: int, trainable=GROUPS, steps: int = STEPS,
              skip: tuple[int, ...] = (), lora: bool = False):
    """Single process: losses and pre-clip grad norms per step, and the trained model.
    Steps in `skip` make no update (what a NaN step must do) and report NaN."""
    model = make_model(trainable, lora=lora)
    opt = build_optimizer(param_groups(model), lr=LR, betas=(0.9, 0.98), eps=1e-6)
    params = [p for p in model.parameters() if p.requires_grad]
    losses, norms = [], []
    for step in range(steps):
        if step in skip:
            losses.append(float("nan"))
            norms.append(float("nan"))
            continue
        total = 0.0
        for rank_batches in step_batches(step, dp):
            for batch in rank_batches:
                loss = model(**model_inputs(batch)).loss / (dp * ACCUM)
                loss.backward()
                total += float(loss.detach())
        norms.append(_clip(params))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses, norms, model
