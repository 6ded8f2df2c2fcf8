"""Memory of the packed-row attention inputs per backend, at several row lengths.

    PYTHONPATH=. python scripts/bench_attention_memory.py [--rows 2] [--lengths 2048,8192]

What `model/attention.py:llm_attention_inputs` builds once per batch for rows packed with
samples of 100-700 tokens: sdpa's dense [B, 1, L, L] boolean mask, eager's additive fp32
mask, flex's BlockMask, flash-attention's cu_seqlens. Reported: the bytes of the tensors
built, and the peak RSS delta of building them (fresh process each). The kernels'
own memory is not included: SDPA's fused kernels and compiled FlexAttention keep O(L)
per head besides the mask; eager attention (and FlexAttention uncompiled, on CPU)
materialise the [B, H, L, L] scores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from bench_common import rss_kib


def _tensor_bytes(obj) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if hasattr(obj, "as_tuple"):  # BlockMask
        return sum(_tensor_bytes(t) for t in obj.as_tuple() if isinstance(t, torch.Tensor))
    return 0


def measure(backend: str, rows: int, length: int) -> dict:
    import torch

    from qwenvl_train.model.attention import llm_attention_inputs

    # Samples of 100..699 tokens packed along each row, the rest padding (segment 0).
    gen = torch.Generator().manual_seed(0)
    sizes = torch.randint(100, 700, (rows, length // 100), generator=gen)
    ids = torch.arange(1, sizes.shape[1] + 1).expand_as(sizes)
    seg = torch.stack([torch.repeat_interleave(i, n)[:length]
                       for i, n in zip(ids, sizes, strict=True)])
    seg[:, -50:] = 0
    llm_attention_inputs(seg[:, :256], backend, torch.float32)  # warm-up
    base = rss_kib("VmRSS")
    inputs = llm_attention_inputs(seg, backend, torch.float32)
    return {"bytes": _tensor_bytes(inputs), "peak_delta_kib": rss_kib("VmHWM") - base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--lengths", default="2048,8192")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        backend, rows, length = args.child
        print(json.dumps(measure(backend, int(rows), int(length))))
        return
    print(f"{args.rows} packed rows; MiB of the attention inputs built once per batch "
          "(peak RSS delta of building them)")
    lengths = [int(x) for x in args.lengths.split(",")]
    print(f"{'backend':18s}" + "".join(f"{'L=' + str(n):>22s}" for n in lengths))
    for backend in ("sdpa", "eager", "flex", "flash_attention_2"):
        cells = []
        for length in lengths:
            out = subprocess.run([sys.executable, __file__, "--child", backend,
                                  str(args.rows), str(length)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            cells.append(f"{r['bytes'] / 2**20:9.3f} ({r['peak_delta_kib'] / 1024:7.1f})")
        print(f"{backend:18s}" + "".join(f"{c:>22s}" for c in cells))


if __name__ == "__main__":
    main()
