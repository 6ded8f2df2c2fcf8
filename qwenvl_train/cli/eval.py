"""`qwenvl-eval`: evaluate a trained model on shards.

    qwenvl-eval runs/demo/sft --root demo_data --shards 'val/*.tar' --table
    qwenvl-eval --export runs/demo/multitask/export --shards 'demo_data/vqa-*.tar' --task vqa

MODEL is a run directory (its `export/` is loaded; its config gives the image size, the
prompt style -- ChatML after stage 3, the paper's base prompts before -- and, when the run
had `eval.tasks`, the shards of each task), an export directory, or a released Qwen-VL
directory. Tasks: caption (CIDEr-D), vqa (VQAv2 accuracy), grounding (accuracy at IoU >=
0.5 after mapping the [0, 1000) box back to pixels) and chat (exact match and token F1 of
every assistant turn of chat-format shards); by default every task the shards hold records
for. Prints JSON (one task: its result; several: task -> result) or, with --table, a
table of the numbers. A task that finds no items says why (which records the shards hold).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from qwenvl_train.eval.tasks import EVAL_TASKS, MAX_NEW_TOKENS, PROMPT_MODES, RECORD_TASKS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwenvl-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="run directory, export directory or released "
                   "Qwen-VL directory")
    p.add_argument("--export", help="the same as MODEL")
    p.add_argument("--shards", help="shard pattern(s), brace/glob, space-separated (default: "
                   "the run's eval.tasks)")
    p.add_argument("--root", default=None, help="directory relative patterns start from "
                   "(default: the run's data.root with the run's eval.tasks, else .)")
    p.add_argument("--task", nargs="+", choices=EVAL_TASKS, default=None,
                   help="default: every task the shards hold records for")
    p.add_argument("--prompt", choices=("auto", *PROMPT_MODES), default="auto",
                   help="base: the paper's prompts; chat: ChatML; auto: chat for a run of "
                   "the sft stage, else base")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most N items per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=None,
                   help="input resolution (default: the run's, else the export's, else 448)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default per task, "
                   "base / chat prompts: " + ", ".join(
                       f"{t} {MAX_NEW_TOKENS['base'][t]}/{MAX_NEW_TOKENS['chat'][t]}"
                       for t in EVAL_TASKS))
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--predictions", metavar="JSONL", default=None,
                   help="also write one JSON line per item here")
    p.add_argument("--table", action="store_true", help="print task / metric / value rows "
                   "instead of JSON")
    return p


def run_config(path: Path) -> dict[str, Any] | None:
    """The training config of the run that `path` (a run or its export) belongs to."""
    for folder in (path, path.parent):
        cfg_file = folder / "config.json"
        if cfg_file.is_file():
            try:
                cfg = json.loads(cfg_file.read_text())
            except ValueError:
                return None
            if isinstance(cfg, dict) and isinstance(cfg.get("stage"), dict):
                return cfg
    return None


def plan(args: argparse.Namespace, run: dict[str, Any] | None) -> tuple[dict[str, str], str]:
    """(task -> shard pattern, root) from the arguments, else the run's `eval.tasks`."""
    run_tasks = ((run or {}).get("eval") or {}).get("tasks") or {}
    if args.shards is None:
        if not run_tasks:
            raise SystemExit("qwenvl-eval: --shards is required (the model is not a run "
                             "directory with eval.tasks)")
        tasks = {t: s for t, s in run_tasks.items() if args.task is None or t in args.task}
        root = args.root or run["eval"].get("root") or run["data"]["root"]
        return tasks, root
    root = args.root or "."
    names = args.task or _tasks_in(args.shards, root)
    return dict.fromkeys(names, args.shards), root


def _tasks_in(shards: str, root: str) -> list[str]:
    from qwenvl_train.eval.items import record_tasks
    from qwenvl_train.eval.run_eval import resolve_shards

    paths = resolve_shards(shards, root)
    if not paths:
        raise SystemExit(f"qwenvl-eval: --shards {shards!r} matches no .tar under {root!r}")
    found = record_tasks(paths)
    tasks = [t for t in EVAL_TASKS if any(found[r] for r in RECORD_TASKS[t])]
    if not tasks:
        held = ", ".join(f"{t} {n}" for t, n in found.most_common()) or "no records"
        raise SystemExit(f"qwenvl-eval: the shards hold no record any task evaluates "
                         f"({held})")
    return tasks


def format_table(results: dict[str, dict[str, Any]]) -> str:
    rows = [("task", "metric", "value")]
    for task, res in results.items():
        rows.append((task, "items", str(res["num_items"])))
        for k, v in res.items():
            if isinstance(v, float):
                rows.append((task, k, f"{v:.4f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = args.model or args.export
    if not path:
        print("qwenvl-eval: name the model: a run directory or an export", file=sys.stderr)
        return 2
    # Imported after parsing: `--help` and a bad option answer without loading torch.
    import torch

    from qwenvl_train.chat.loading import load_for_chat
    from qwenvl_train.chat.prompt import ChatError
    from qwenvl_train.eval.run_eval import evaluate

    run = run_config(Path(path))
    try:
        tasks, root = plan(args, run)
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2
    if not tasks:
        print(f"qwenvl-eval: the run evaluates none of {args.task}", file=sys.stderr)
        return 2
    stage = (run or {}).get("stage", {})
    mode = args.prompt if args.prompt != "auto" else (
        "chat" if stage.get("template") == "sft" else "base")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = load_for_chat(path, device=device, dtype=getattr(torch, args.dtype),
                              image_size=args.image_size or stage.get("image_size"))
    except ChatError as e:
        print(f"qwenvl-eval: {e}", file=sys.stderr)
        return 2
    results, predictions = {}, []
    for task, shards in tasks.items():
        res = evaluate(model, shards, task, root=root, limit=args.limit,
                       batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                       return_predictions=bool(args.predictions), mode=mode)
        predictions += [{"task": task, **r} for r in res.pop("predictions", [])]
        if "note" in res:
            print(f"qwenvl-eval: {task}: 0 items: {res['note']}", file=sys.stderr)
        results[task] = res
    if args.predictions:
        Path(args.predictions).write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in predictions))
    if args.table:
        print(format_table(results))
    else:
        json.dump(results[next(iter(results))] if len(results) == 1 else results, sys.stdout,
                  indent=1)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
