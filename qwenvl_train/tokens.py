"""Token-level constants shared by data, model, training and eval (no heavy imports).

The Qwen-VL special tokens at their released ids (docs/recipe.md), and the label value
that carries no loss.
"""

from __future__ import annotations

IGNORE_INDEX = -100  # a label position without loss (PyTorch's cross-entropy default)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
REF_START, REF_END = "<ref>", "</ref>"
BOX_START, BOX_END = "<box>", "</box>"
QUAD_START, QUAD_END = "<quad>", "</quad>"
IMG_START, IMG_END = "<img>", "</img>"
IMG_PAD = "<imgpad>"

FIRST_SPECIAL_ID = 151643
SPECIALS: tuple[str, ...] = (
    ENDOFTEXT,
    IM_START,
    IM_END,
    *(f"<|extra_{i}|>" for i in range(205)),
    REF_START,
    REF_END,
    BOX_START,
    BOX_END,
    QUAD_START,
    QUAD_END,
    IMG_START,
    IMG_END,
    IMG_PAD,
)
SPECIAL_TOKEN_IDS: dict[str, int] = {t: FIRST_SPECIAL_ID + i for i, t in enumerate(SPECIALS)}

EOD_ID = SPECIAL_TOKEN_IDS[ENDOFTEXT]  # 151643: end of document, also the pad id
IM_START_ID = SPECIAL_TOKEN_IDS[IM_START]  # 151644
IM_END_ID = SPECIAL_TOKEN_IDS[IM_END]  # 151645
IMG_START_ID = SPECIAL_TOKEN_IDS[IMG_START]  # 151857
IMG_END_ID = SPECIAL_TOKEN_IDS[IMG_END]  # 151858
IMG_PAD_ID = SPECIAL_TOKEN_IDS[IMG_PAD]  # 151859: one image slot

# Released model's embedding rows (padded for efficiency; ids >= 151860 are never produced).
MODEL_VOCAB_SIZE = 151936
