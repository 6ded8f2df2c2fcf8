"""`qwenvl-data inspect SHARD --stage ...`: print samples exactly as the model sees them.

Loss-bearing tokens are wrapped in ⟦ ⟧; a run of image slots prints as `<imgpad>x256`.
A sample the training loader would skip (unreadable JSON, a missing image, ...) prints as
`SKIPPED <reason>` and is counted by reason. Images are decoded only to draw them
(`--draw`): then an image that does not decode skips its sample as `bad_image`, as in
training.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from qwenvl_train.tokens import IGNORE_INDEX

from .config import MAX_IMAGE_PIXELS, TEMPLATES
from .reader import ShardFile, index_tar
from .records import read_record
from .schema import TASKS, Sample, SampleError
from .templates import accepts
from .tokenizer import IMG_PAD, QwenVLTokenizer, get_tokenizer

LOSS_OPEN, LOSS_CLOSE = "⟦", "⟧"
DEFAULT_SEQ_LEN = {"pretrain": 512, "multitask": 2048, "sft": 2048}
IMAGE_SIZE = {"pretrain": 224, "multitask": 448, "sft": 448}  # the stages' resolution


def format_tokens(ids: list[int], labels: list[int], tok: QwenVLTokenizer) -> str:
    """Readable text of a token sequence; loss spans in ⟦ ⟧, imgpad runs collapsed."""
    out: list[str] = []
    in_loss = False
    i = 0
    while i < len(ids):
        loss = labels[i] != IGNORE_INDEX
        if loss != in_loss:
            out.append(LOSS_OPEN if loss else LOSS_CLOSE)
            in_loss = loss
        if ids[i] == tok.img_pad_id:
            j = i
            while j < len(ids) and ids[j] == tok.img_pad_id and (labels[j] != IGNORE_INDEX) == loss:
                j += 1
            out.append(f"{IMG_PAD}x{j - i}")
            i = j
            continue
        # decode runs of plain tokens together so multi-byte characters print whole
        j = i + 1
        while (j < len(ids) and ids[j] != tok.img_pad_id
               and (labels[j] != IGNORE_INDEX) == loss and ids[j] < tok.eod_id
               and ids[i] < tok.eod_id):
            j += 1
        out.append(tok.decode(ids[i:j]))
        i = j
    if in_loss:
        out.append(LOSS_CLOSE)
    return "".join(out)


def inspect_shard(path: str, stage: str, n: int, num_image_tokens: int, seq_len: int,
                  draw_dir: str | None = None, out=print,
                  max_image_pixels: int = MAX_IMAGE_PIXELS) -> dict:
    """Print the first `n` samples of a shard; return counts by outcome. Records are read
    as the training loader reads them (`records.read_record`), task filter last so that a
    filtered sample still shows what it is."""
    # Imported here: `qwenvl-data --help` must not load torch.
    from .encode import encode_tokens
    from .images import decode_images

    tok = get_tokenizer()
    index = index_tar(path)
    counts: dict[str, int] = {}
    if index.error:
        out(f"!! {path}: {index.error}")
        counts["bad_tar"] = 1
    f = ShardFile(path)
    try:
        for entry in index.entries[:n]:
            out(f"--- {entry.key}  members: {sorted(entry.members)}")
            try:
                sample = read_record(entry, f, max_image_pixels=max_image_pixels).sample
            except SampleError as e:
                out(f"   SKIPPED {e.reason}: {e.msg}")
                counts[e.reason] = counts.get(e.reason, 0) + 1
                continue
            sizes = ", ".join(f"{w}x{h}" for w, h in sample.image_sizes) or "none"
            out(f"    task={sample.task} (id {TASKS.index(sample.task)}) "
                f"source={sample.source} images={sizes}")
            if not accepts(stage, sample.task):
                out(f"    FILTERED: the {stage} template does not take {sample.task}")
                counts["filtered"] = counts.get("filtered", 0) + 1
                continue
            try:
                tokens = encode_tokens(sample, stage, tok, num_image_tokens, seq_len)
                if draw_dir:  # the loader's decode step: an undecodable image skips the sample
                    decode_images(sample, tokens.image_order, IMAGE_SIZE[stage],
                                  max_pixels=max_image_pixels)
            except SampleError as e:
                out(f"   SKIPPED {e.reason}: {e.msg}")
                counts[e.reason] = counts.get(e.reason, 0) + 1
                continue
            n_loss = sum(lab != IGNORE_INDEX for lab in tokens.labels)
            out(f"    {len(tokens.input_ids)} tokens, {n_loss} with loss")
            out(format_tokens(tokens.input_ids, tokens.labels, tok))
            counts["ok"] = counts.get("ok", 0) + 1
            if draw_dir:
                _draw(sample, draw_dir, out)
    finally:
        f.close()
    return counts


def _draw(sample: Sample, draw_dir: str, out) -> None:
    from .draw import draw_sample  # written separately; imported only when asked for

    Path(draw_dir).mkdir(parents=True, exist_ok=True)
    dest = Path(draw_dir) / f"{sample.key.replace('/', '_')}.png"
    try:  # decodes every image of the record, also any that its text does not use
        draw_sample(sample, dest)
    except (OSError, SyntaxError, ValueError) as e:  # how PIL reports undecodable data
        out(f"    not drawn: bad_image: {e}")
        return
    out(f"    drawn: {dest}")


def _handler(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.shard):
        print(f"qwenvl-data inspect: {args.shard}: no such file (a .tar shard, e.g. "
              "demo_data/caption-00000.tar)", file=sys.stderr)
        return 2
    counts = inspect_shard(args.shard, args.stage, args.n, args.num_image_tokens,
                           args.seq_len or DEFAULT_SEQ_LEN[args.stage], args.draw,
                           max_image_pixels=args.max_image_pixels)
    print(f"=== {json.dumps(counts, sort_keys=True)}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="print shard samples as the model sees them",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shard", help="a .tar shard")
    p.add_argument("--stage", choices=TEMPLATES, required=True, help="stage template")
    p.add_argument("-n", type=int, default=5, help="samples to show (default 5)")
    p.add_argument("--num-image-tokens", type=int, default=256,
                   help="image slots per image (256 in Qwen-VL)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="truncation length (default: the stage's, 512 or 2048)")
    p.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS,
                   help="skip images declared larger, as data.max_image_pixels does "
                        f"(default {MAX_IMAGE_PIXELS})")
    p.add_argument("--draw", metavar="DIR", default=None,
                   help="also draw each sample's images with its boxes into DIR (decodes "
                        "them: a sample whose image does not decode is skipped as bad_image)")
    p.set_defaults(func=_handler)
