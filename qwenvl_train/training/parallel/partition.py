"""Compute-balanced pipeline split of a Qwen-VL model.

The pipeline is the registry's chain of slots (`groups.pipeline_slots`): [vision+embed,
decoder 0 .. decoder n-1, norm+head+loss].
Each layer is weighed by its training FLOPs per row (flops.py): the first layer by the ViT
and adapter at the stage's resolution times the images per row, a decoder layer at the
stage's sequence length, the head at the vocabulary projection; trained parts count 3x
their forward, frozen parts that still pass gradients back 2x, frozen parts in front of
everything trained 1x. Weighing by trainable parameters (DeepSpeed's default) would
give frozen layers zero weight; weighing by layer count ignores that a 448px ViT costs
as much as dozens of decoder layers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qwenvl_train.model import groups
from qwenvl_train.training.observe import flops

if TYPE_CHECKING:
    from qwenvl_train.model.config import QwenVLConfig

TEXT_TOKENS_PER_IMAGE = 64  # assumed caption/answer tokens per image in packed rows


@dataclass(frozen=True)
class PipelineSplit:
    parts: list[int]  # DeepSpeed convention: stage s holds layers [parts[s], parts[s+1])
    layer_names: list[str]
    layer_cost: list[float]  # training FLOPs per row

    def stage_cost(self, stage: int) -> float:
        return sum(self.layer_cost[self.parts[stage]:self.parts[stage + 1]])

    def describe(self) -> str:
        total = sum(self.layer_cost)
        lines = []
        for s in range(len(self.parts) - 1):
            lo, hi = self.parts[s], self.parts[s + 1]
            names = self.layer_names[lo:hi]
            span = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"
            cost = self.stage_cost(s)
            lines.append(f"stage {s}: layers [{lo}, {hi}) {span} ({hi - lo} layers)  "
                         f"{cost / 1e12:9.2f} TFLOP/row  {100 * cost / total:5.1f}%")
        worst = max(self.stage_cost(s) for s in range(len(self.parts) - 1))
        ideal = total / (len(self.parts) - 1)
        lines.append(f"bottleneck {worst / 1e12:.2f} TFLOP/row vs ideal {ideal / 1e12:.2f} "
                     f"(balance {ideal / worst:.0%})")
        if self.parts[1] == 1 and self.stage_cost(0) == worst and len(self.parts) > 2:
            lines.append("note: the vision layer alone exceeds an even share; fewer pipeline "
                         "stages (or tensor parallelism) balance better at this resolution")
        return "\n".join(lines)


def images_per_row(seq_len: int, num_queries: int, pack: bool) -> float:
    """Expected images per LLM row: one for unpacked rows; packed rows hold as many
    `<img>` spans (+ some text) as fit."""
    if not pack:
        return 1.0
    return seq_len / (num_queries + 2 + TEXT_TOKENS_PER_IMAGE)


def layer_costs(
    model_cfg: QwenVLConfig,
    image_size: int,
    seq_len: int,
    trainable: Iterable[str],
    images: float,
    adapted: Iterable[str] = (),
) -> tuple[list[str], list[float]]:
    """Names (the registry's pipeline slots) and training FLOPs per row of the layers
    (`adapted`: the LoRA groups)."""
    mult = flops.part_multipliers(trainable, model_cfg.adapter.post_group, adapted)
    fwd = flops.forward_flops_by_part(model_cfg, image_size, seq_len, 1, seq_len)
    # forward_flops_by_part takes an int image count; scale the per-image parts instead.
    vision = sum(mult[p] * fwd[p] * images for p in groups.VISION_PARTS)
    llm = model_cfg.llm
    decoder = mult[groups.LLM] * seq_len * flops.llm_layer_flops(llm, seq_len)
    head = mult[groups.LLM] * seq_len * flops.lm_head_flops(llm)
    names = [slot.name for slot in groups.pipeline_slots(llm.num_layers)]
    return names, [vision] + [decoder] * llm.num_layers + [head]


def _min_bottleneck(prefix: list[float], num_stages: int) -> float:
    """Smallest achievable largest-stage cost (dynamic programme over cut points)."""
    n = len(prefix) - 1
    best = [[math.inf] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, num_stages + 1):
        for i in range(k, n + 1):
            best[k][i] = min(max(best[k - 1][j], prefix[i] - prefix[j]) for j in range(k - 1, i))
    return best[num_stages][n]


def balanced_parts(costs: Sequence[float], num_stages: int) -> list[int]:
    """Contiguous split into `num_stages` non-empty stages: first minimise the largest stage
    cost (the pipeline's throughput), then, among those splits, the sum of squared stage
    costs (so the stages behind a bottleneck that cannot shrink, e.g. the ViT, stay even)."""
    n = len(costs)
    if not 1 <= num_stages <= n:
        raise ValueError(f"cannot split {n} layers into {num_stages} non-empty stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    cap = _min_bottleneck(prefix, num_stages) * (1 + 1e-9)
    # sq[k][i]: least sum of squares of the first i layers in k stages, each <= cap.
    sq = [[math.inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    sq[0][0] = 0.0
    for k in range(1, num_stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                stage = prefix[i] - prefix[j]
                if stage <= cap and sq[k - 1][j] + stage * stage < sq[k][i]:
                    sq[k][i], cut[k][i] = sq[k - 1][j] + stage * stage, j
    parts, i = [n], n
    for k in range(num_stages, 0, -1):
        i = cut[k][i]
        parts.append(i)
    return parts[::-1]


def plan_split(
    model_cfg: QwenVLConfig,
    num_stages: int,
    image_size: int,
    seq_len: int,
    trainable: Iterable[str],
    images: float | None = None,
    pack: bool = False,
    adapted: Iterable[str] = (),
) -> PipelineSplit:
    """The compute-balanced split for a stage config (all ranks compute the same one)."""
    if images is None:
        images = images_per_row(seq_len, model_cfg.adapter.num_queries, pack)
    names, costs = layer_costs(model_cfg, image_size, seq_len, trainable, images, adapted)
    return PipelineSplit(balanced_parts(costs, num_stages), names, costs)
