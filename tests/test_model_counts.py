"""The real 9.6B architecture built on the meta device: parameter counts match docs/recipe.md."""

from __future__ import annotations

import torch

from qwenvl_train.model.config import QwenVLConfig
from qwenvl_train.model.groups import PARTS, part_of
from qwenvl_train.model.qwenvl import build_model


def test_qwenvl_7b_meta_counts():
    with torch.device("meta"):
        model = build_model(QwenVLConfig(), 448)
    # Released layout = every tensor of the checkpoint, incl. the sin-cos buffer pos_embed.
    tensors = model.state_dict(keep_vars=True)

    def count(part: str) -> int:
        return sum(t.numel() for k, t in tensors.items() if part_of(k) == part)

    vit, adapter, post, llm = (count(p) for p in PARTS)  # post = ln_post + proj
    total = vit + adapter + post + llm
    print(f"\n[7B counts] ViT trunk {vit:,} ({vit / 1e9:.3f}B); adapter cross-attention "
          f"{adapter:,} ({adapter / 1e9:.3f}B); ln_post+proj {post:,}; LLM {llm:,} "
          f"({llm / 1e9:.2f}B); total {total:,} ({total / 1e9:.3f}B); "
          f"bf16 bytes {2 * total:,}; trainable-capable parameters "
          f"{sum(p.numel() for p in model.parameters()):,}")
    assert round(vit / 1e9, 3) == 1.843
    assert round(adapter / 1e9, 3) == 0.076
    assert round(llm / 1e9, 2) == 7.72
    assert round(total / 1e9, 3) == 9.657
    assert 2 * total == 19_313_870_336
    assert all(t.is_meta for t in tensors.values())
