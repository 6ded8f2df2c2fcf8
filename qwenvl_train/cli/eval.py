"""`qwenvl-eval`: evaluate an exported model on shards with the paper's prompts.

    qwenvl-eval --export runs/demo/multitask/export --shards 'demo_data/vqa-*.tar' --task vqa

Reports VQA accuracy (VQAv2 rule), grounding accuracy (IoU >= 0.5 after mapping the
[0, 1000) box back to pixels) or CIDEr-D as JSON on stdout. EXPORT is a consolidated export
(`run_dir/export`, written at the end of every stage).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qwenvl_train.eval.tasks import EVAL_TASKS, MAX_NEW_TOKENS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwenvl-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", required=True, help="consolidated export directory")
    p.add_argument("--shards", required=True, help="shard pattern(s), brace/glob, space-separated")
    p.add_argument("--root", default=".", help="directory relative patterns start from")
    p.add_argument("--task", choices=EVAL_TASKS, required=True)
    p.add_argument("--limit", type=int, default=None, help="evaluate at most N items")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=448, help="input resolution (stage 2/3: 448)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default per task: " +
                   ", ".join(f"{task} {n}" for task, n in MAX_NEW_TOKENS.items()))
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--predictions", metavar="JSONL", default=None,
                   help="also write one JSON line per item here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Imported after parsing: `--help` and a bad option answer without loading torch.
    import torch

    from qwenvl_train.eval.run_eval import evaluate, load_export

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_export(args.export, args.image_size, device, getattr(torch, args.dtype))
    result = evaluate(model, args.shards, args.task, root=args.root, limit=args.limit,
                      batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                      return_predictions=bool(args.predictions))
    if args.predictions:
        Path(args.predictions).write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.pop("predictions")))
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
