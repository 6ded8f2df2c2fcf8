"""Peak memory and CPU time of the LM head + loss, plain vs chunked (model.chunked_loss).

    PYTHONPATH=. python scripts/bench_loss_memory.py [--rows 2] [--seq 2048] [--hidden 64]

Each measurement runs in a fresh process: the head (vocab 151,936) and the loss forward and
backward over rows x (seq - 1) label positions, through `LMHead` exactly as the model calls
it. Reported: the peak RSS delta (VmHWM after minus VmRSS before; the inputs, weight and
its gradient are allocated before the baseline, so the delta is what the head+loss path
adds), the CPU seconds of forward+backward, and the analytic size of the [tokens, vocab]
buffers the plain path holds. The hidden size only changes the (same-size in both paths)
gradient tensors, so a small one measures the logits memory at the real vocabulary.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from bench_common import rss_kib

VOCAB = 151936


def measure(path: str, tokens: int, hidden: int, dtype: str) -> dict:
    import torch

    from qwenvl_train.model.loss import LMHead

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    head = LMHead(hidden, VOCAB, bias=False).to(dt)
    head.weight.grad = torch.zeros_like(head.weight)  # the param gradient exists in both
    h = torch.randn(tokens, hidden, dtype=dt, requires_grad=True)
    targets = torch.randint(0, VOCAB, (tokens,))
    # Warm the allocator and kernels on a tiny batch, then take the baseline.
    head(h[:8].detach().requires_grad_(), targets[:8], chunked=path == "chunked")[0].backward()
    head.weight.grad.zero_()
    base = rss_kib("VmRSS")
    t0 = time.process_time()
    total, _ = head(h, targets, chunked=path == "chunked")
    (total / tokens).backward()
    cpu = time.process_time() - t0
    peak = rss_kib("VmHWM")
    return {"path": path, "tokens": tokens, "hidden": hidden, "dtype": dtype,
            "peak_delta_mib": (peak - base) / 1024, "cpu_s": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path, tokens, hidden, dtype = args.child
        print(json.dumps(measure(path, int(tokens), int(hidden), dtype)))
        return
    from qwenvl_train.model.loss import chunk_tokens

    tokens = args.rows * (args.seq - 1)
    chunk = chunk_tokens(VOCAB)
    print(f"{args.rows} x {args.seq} tokens -> {tokens} label positions, vocab {VOCAB}, "
          f"hidden {args.hidden}; chunk {chunk} tokens")
    for dtype in args.dtypes.split(","):
        size = 4 if dtype == "float32" else 2
        nv = tokens * VOCAB
        print(f"\n{dtype}: [tokens, vocab] = {nv * 4 / 2**30:.2f} GiB in fp32"
              + (f", {nv * size / 2**30:.2f} GiB in {dtype}" if size != 4 else ""))
        for path in ("plain", "chunked"):
            out = subprocess.run([sys.executable, __file__, "--child", path, str(tokens),
                                  str(args.hidden), dtype], capture_output=True, text=True,
                                 check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  {path:8s} peak +{r['peak_delta_mib']:9.0f} MiB   fwd+bwd "
                  f"{r['cpu_s']:6.2f} CPU-s")


if __name__ == "__main__":
    main()
