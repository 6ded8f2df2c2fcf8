#!/usr/bin/env python
"""Training FLOPs per step of each stage, and the step time a target MFU implies.

    python scripts/estimate_mfu.py                        # qwenvl_7b, A100 bf16, 128 GPUs
    python scripts/estimate_mfu.py --device "H100" --gpus 256 --mfu 0.35 0.45

Reads configs/model/<model>.yaml (as a QwenVLConfig) and configs/stage/*.yaml with OmegaConf
(no Hydra). The
FLOPs are `qwenvl_train.training.observe.flops.step_flops` (see its docstring for the formula).
Assumptions, printed with the table: every row of a step is computed at full `seq_len`
(padded or packed), unpacked rows hold one image, packed rows hold
`--packed-samples-per-row` samples of equal length with one image each, and the lm_head
runs at every position (an upper bound; the model computes logits at label positions only).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from qwenvl_train.model.config import QwenVLConfig  # noqa: E402
from qwenvl_train.training.observe import flops as F  # noqa: E402

CONFIGS = ROOT / "qwenvl_train" / "configs"
STAGES = ("pretrain", "multitask", "sft")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwenvl_7b")
    ap.add_argument("--device", default="A100", help="GPU name as torch reports it (substring)")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the table")
    ap.add_argument("--gpus", type=int, default=128)
    ap.add_argument("--mfu", type=float, nargs="+", default=[0.3, 0.4, 0.5])
    ap.add_argument("--packed-samples-per-row", type=int, default=4)
    args = ap.parse_args(argv)

    model = QwenVLConfig.from_dict(OmegaConf.load(CONFIGS / "model" / f"{args.model}.yaml"))
    peak = F.peak_flops(args.device, args.dtype, args.peak_tflops)
    if peak is None:
        ap.error(f"no peak for {args.device!r} {args.dtype}; pass --peak-tflops")
    print(f"model {args.model}; {args.gpus} x {args.device} at {peak / 1e12:.0f} TFLOP/s "
          f"{args.dtype} peak; lm_head at every position; rows full to seq_len")
    mfu_cols = "".join(f" {'t@' + format(m, '.0%'):>9}" for m in args.mfu)
    gpu_h_col = "GPU-h@" + format(args.mfu[-1], ".0%")
    print(f"{'stage':<10} {'trained':<18} {'batch':>6} {'S':>4} {'L':>5} {'img/row':>7} "
          f"{'PFLOP/step':>10} {'vit%':>5} {'adp%':>5} {'llm%':>5}{mfu_cols} {gpu_h_col:>11}")
    for name in STAGES:
        st = OmegaConf.load(CONFIGS / "stage" / f"{name}.yaml")
        per_row = args.packed_samples_per_row if st.pack else 1
        rows, seq = int(st.global_batch_size), int(st.seq_len)
        seg = seq / per_row if st.pack else None
        tokens, images = rows * seq, rows * per_row
        step = F.step_flops(model, st.image_size, tokens, images, seq, st.trainable,
                            segment_len=seg)
        fwd = F.forward_flops_by_part(model, st.image_size, tokens, images, seq,
                                      segment_len=seg)
        mult = F.part_multipliers(st.trainable, model.adapter.post_group)
        vit_share = mult["vit"] * fwd["vit"] / step
        llm_share = mult["llm"] * fwd["llm"] / step
        adp_share = 1.0 - vit_share - llm_share  # cross-attention + ln_post/proj
        times = "".join(f" {step / (args.gpus * peak * m):>8.1f}s" for m in args.mfu)
        gpu_h = st.steps * step / (peak * args.mfu[-1]) / 3600
        print(f"{name:<10} {'+'.join(st.trainable):<18} {rows:>6} {st.image_size:>4} {seq:>5} "
              f"{per_row:>7} {step / 1e15:>10.1f} {100 * vit_share:>5.1f} "
              f"{100 * adp_share:>5.1f} {100 * llm_share:>5.1f}{times} {gpu_h:>11,.0f}")
    print("t@X = step time for MFU X on all GPUs; GPU-h = whole stage (steps from the config)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
