"""`qwenvl-chat EXPORT`: talk to a trained model on the console, or answer a JSONL file.

    qwenvl-chat runs/demo/sft/export
    user> <img>photos/cat.jpg</img>Where is the cat?
    assistant> <ref>the cat</ref><box>(112,80),(870,940)</box>
      [the cat] (72.0,38.6)-(557.1,451.4) px
      boxes drawn on photos/cat.jpg: qwenvl-chat-boxes/20260101-120000-001.png

(the answer of a model that has learnt grounding; the box is printed in pixels of the
640x480 photo).

Images: `<img>PATH</img>` anywhere in a message, several per message (Picture 1, 2, ... in
chat mode). `<ref> </ref> <box> </box> <quad> </quad>` typed in a message are the model's
grounding tokens. Commands: /clear (new conversation), /exit (or Ctrl-D), /help. Ctrl-C
stops an answer (the message is dropped). `--mode chat` (SFT models: ChatML) or `--mode
base` (pretrained models: the paper's prompts, e.g. `<img>a.jpg</img>Describe the image in
English:`, `<img>a.jpg</img>What colour is it? Answer:`, `<img>a.jpg</img><ref>the
cat</ref><box>`); exactly what each sends: qwenvl_train/chat/prompt.py. When an answer
holds boxes or quads, the latest image is written with them drawn and labelled, mapped
back to its original pixels. `--batch FILE.jsonl`: qwenvl_train/chat/batch.py.
EXPORT: a consolidated export (run_dir/export, or the run directory), or a directory in the
released Qwen-VL layout.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from qwenvl_train.chat.batch import read_batch, run_batch
from qwenvl_train.chat.loading import detect_layout, load_for_chat
from qwenvl_train.chat.prompt import MODES, ChatError
from qwenvl_train.chat.session import Answer, ChatSession, GenerationOptions

HELP = ("<img>PATH</img> adds an image; /clear starts over; /exit quits (or Ctrl-D); "
        "Ctrl-C stops an answer")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwenvl-chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", help="export directory (ours or the released Qwen-VL layout)")
    p.add_argument("--mode", choices=MODES, default="chat",
                   help="chat: ChatML (SFT models); base: the paper's base-model prompts")
    p.add_argument("--system", default=None,
                   help="chat mode system prompt (default: You are a helpful assistant.)")
    p.add_argument("--batch", metavar="JSONL", default=None,
                   help="answer the prompts of this file instead of a console session")
    p.add_argument("--out", metavar="JSONL", default=None,
                   help="--batch answers go here (default: stdout)")
    p.add_argument("--box-dir", default="qwenvl-chat-boxes",
                   help="where images with the answer's boxes drawn are written")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 (default): greedy; > 0: sampling at this temperature")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling (with --temperature)")
    p.add_argument("--top-k", type=int, default=0,
                   help="top-k sampling, 0 = off (with --temperature)")
    p.add_argument("--seed", type=int, default=None, help="seed torch before every answer")
    p.add_argument("--no-stream", action="store_true", help="print answers when complete")
    p.add_argument("--image-size", type=int, default=None,
                   help="input resolution (default: 448, or the released config's)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    return p


def _print_boxes(answer: Answer) -> None:
    for g in answer.grounding:
        label = g["ref"] or "-"
        shapes = g.get("boxes") or ([g["quad"]] if "quad" in g else None)
        if shapes is None:  # no image in the dialogue: [0, 1000) units only
            shapes = g.get("boxes_1000") or [g.get("quad_1000")]
            print(f"  [{label}] {shapes} (of 1000; no image to map to)")
            continue
        for s in shapes:
            pts = ([(s[0], s[1]), (s[2], s[3])] if "boxes" in g else s)
            text = "-".join(f"({x:.1f},{y:.1f})" for x, y in pts)
            print(f"  [{label}] {text} px")
    if answer.box_image:
        print(f"  boxes drawn on {answer.image}: {answer.box_image}")


class _Printer:
    """Streams an answer to the console; "assistant> " goes out with the first piece (so
    an unreadable image is reported before it)."""

    def __init__(self) -> None:
        self.started = False

    @property
    def newline(self) -> str:
        return "\n" if self.started else ""

    def __call__(self, piece: str) -> None:
        if not self.started:
            self.started = True
            print("assistant> ", end="")
        print(piece, end="", flush=True)


def interactive(session: ChatSession, stream: bool) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    print(f"qwenvl-chat ({session.mode} mode). {HELP}.")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    echo = not sys.stdin.isatty()  # piped input: show it, so the output reads as a session
    n = 0
    while True:
        try:
            line = input("user> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if echo:
            print(line)
        cmd = line.strip()
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/clear":
            session.reset()
            print("(new conversation)")
            continue
        if cmd in ("/help", "/?"):
            print(HELP)
            continue
        if not cmd:
            continue
        n += 1
        show = _Printer()
        try:
            answer = session.ask(line, on_text=show if stream else None, name=f"{stamp}-{n:03d}")
        except ChatError as e:
            print(f"{show.newline}  ({e})")
            continue
        except KeyboardInterrupt:
            print(f"{show.newline}  (stopped; the message is dropped)")
            continue
        if show.started:
            print()
        else:
            print(f"assistant> {answer.text}")
        _print_boxes(answer)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if sys.stdout.encoding and sys.stdout.encoding.lower().replace("-", "") != "utf8":
        sys.stdout.reconfigure(errors="replace")  # a non-UTF-8 console: no crash on Chinese
    options = GenerationOptions(args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                                args.seed)
    try:  # every user error before the model is loaded
        options.validate()
        detect_layout(args.export)
        items = read_batch(args.batch) if args.batch else None
        if args.out and not args.batch:
            raise ChatError("--out is for --batch answers")
    except ChatError as e:
        print(f"qwenvl-chat: {e}", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = load_for_chat(args.export, device=device, dtype=getattr(torch, args.dtype),
                              image_size=args.image_size)
    except (ChatError, ValueError, FileNotFoundError) as e:
        print(f"qwenvl-chat: cannot load {args.export}: {e}", file=sys.stderr)
        return 2
    session = ChatSession(model, mode=args.mode, options=options, system=args.system,
                          box_dir=args.box_dir)
    if items is None:
        return interactive(session, stream=not args.no_stream)
    base_dir = Path(args.batch).parent
    try:
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "w", encoding="utf-8") as out:
                run_batch(session, items, out, base_dir, log=sys.stdout)
            print(f"answers: {args.out}")
        else:
            run_batch(session, items, sys.stdout, base_dir)
    except ChatError as e:  # e.g. a conversation longer than the model's positions
        print(f"qwenvl-chat: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
