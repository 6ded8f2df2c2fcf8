"""Load a model to talk to from either export layout (model/export.py finds and reads it):
our consolidated export (`run_dir/export`, or a run directory), `export/released`, or a
released Qwen-VL / Qwen-VL-Chat download.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qwenvl_train.chat.prompt import ChatError


def detect_layout(path: str | Path) -> tuple[str, Path]:
    """('consolidated' | 'released', directory); raises ChatError naming what is missing."""
    from qwenvl_train.model.export import find_export

    try:
        return find_export(path)
    except (FileNotFoundError, ValueError) as e:
        raise ChatError(str(e)) from None


def load_for_chat(path: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                  image_size: int | None = None):
    """The eval-mode `QwenVL` of an export of either layout on `device` in `dtype`. Images
    are resized to `image_size` (default: the size the export was made at, else 448)."""
    from qwenvl_train.model.export import load_for_inference

    detect_layout(path)
    try:
        model, _ = load_for_inference(path, image_size=image_size, device=device, dtype=dtype)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise ChatError(f"{path}: cannot load the export: {e}") from None
    return model
