"""Golden renderings: every task under every stage template, as exact token ids + loss masks.

Each case has a hand-written expectation (the text with special tokens, loss spans in
⟦ ⟧, `<imgpad>xN` runs) that `_from_text` turns into ids independently of the templates,
and frozen literal ids / masks. Images: 640x480 (chat image 2: 100x200), 2 image slots.
"""

from __future__ import annotations

import re

import pytest

from qwenvl_train.data.encode import encode_tokens, pieces_to_ids
from qwenvl_train.data.inspect import format_tokens
from qwenvl_train.data.records import parse_record
from qwenvl_train.data.schema import TASKS
from qwenvl_train.data.templates import accepts, render
from qwenvl_train.data.tokenizer import SPECIAL_TOKEN_IDS, get_tokenizer
from qwenvl_train.tokens import IGNORE_INDEX

IM = [{"width": 640, "height": 480}]
RECORDS = {
    "caption": {"task": "caption", "source": "s", "images": IM, "caption": "A red bus."},
    "vqa": {"task": "vqa", "source": "s", "images": IM,
            "qa": [{"question": "What colour?", "answer": "red"},
                   {"question": "Is it big?", "answer": "yes"}]},
    "grounding": {"task": "grounding", "source": "s", "images": IM,
                  "refs": [{"expression": "a bus",
                            "boxes": [[0, 0, 640, 480], [64, 48, 320.5, 240]]}]},
    "ref_grounding": {"task": "ref_grounding", "source": "s", "images": IM,
                      "refs": [{"expression": "the left bus", "boxes": [[6.4, 4.8, 639, 479]]}]},
    "grounded_caption": {"task": "grounded_caption", "source": "s", "images": IM,
                         "caption": "A bus near a tree.",
                         "spans": [{"start": 0, "end": 5, "boxes": [[0, 0, 320, 240]]},
                                   {"start": 11, "end": 17, "boxes": [[400, 100, 600, 400]]}]},
    "ocr": {"task": "ocr", "source": "s", "images": IM,
            "regions": [{"text": "STOP", "quad": [[10, 10], [100, 12], [98, 60], [9, 58]]},
                        {"text": "Exit", "box": [320, 240, 640, 480]}]},
    "text": {"task": "text", "source": "s", "images": [], "text": "Hello world."},
    "chat": {"task": "chat", "source": "s", "images": IM + [{"width": 100, "height": 200}],
             "messages": [
                 {"role": "user", "content": [{"type": "image", "image": 0},
                                              {"type": "text", "text": "What is it?"}]},
                 {"role": "assistant", "content": [{"type": "text", "text": "A bus."}]},
                 {"role": "user", "content": [{"type": "image", "image": 1},
                                              {"type": "text", "text": "Where is the man?"}]},
                 {"role": "assistant", "content": [{"type": "box", "ref": "The man",
                                                    "image": 1,
                                                    "boxes": [[10, 20, 50, 100]]}]}]},
}

# (stage, task): (hand-written rendering, frozen input_ids, frozen loss mask)
GOLDEN = {
    ('pretrain', 'caption'): (
        '<img><imgpad>x2</img>⟦A red bus.<|endoftext|>⟧',
        [151857, 151859, 151859, 151858, 32, 2518, 5828, 13, 151643],
        '000011111'),
    ('multitask', 'caption'): (
        '<img><imgpad>x2</img>Describe the image in English:⟦ A red bus.<|endof'
        'text|>⟧',
        [151857, 151859, 151859, 151858, 74785, 279, 2168, 304, 6364, 25, 362, 2518, 5828, 13,
         151643],
        '000000000011111'),
    ('multitask', 'vqa'): (
        '<img><imgpad>x2</img>What colour? Answer:⟦ red⟧\nIs it big? Answer:⟦ ye'
        's<|endoftext|>⟧',
        [151857, 151859, 151859, 151858, 3838, 12463, 30, 21806, 25, 2518, 198, 3872, 432, 2409,
         30, 21806, 25, 9834, 151643],
        '0000000001000000011'),
    ('multitask', 'grounding'): (
        '<img><imgpad>x2</img><ref>a bus</ref>⟦<box>(0,0),(999,999)</box><box>('
        '100,100),(500,500)</box><|endoftext|>⟧',
        [151857, 151859, 151859, 151858, 151851, 64, 5828, 151852, 151853, 7, 15, 11, 15, 23547,
         24, 24, 24, 11, 24, 24, 24, 8, 151854, 151853, 7, 16, 15, 15, 11, 16, 15, 15, 23547, 20,
         15, 15, 11, 20, 15, 15, 8, 151854, 151643],
        '0000000011111111111111111111111111111111111'),
    ('multitask', 'ref_grounding'): (
        '<img><imgpad>x2</img><ref>the left bus</ref>⟦<box>(10,10),(998,997)</b'
        'ox><|endoftext|>⟧',
        [151857, 151859, 151859, 151858, 151851, 1782, 2115, 5828, 151852, 151853, 7, 16, 15, 11,
         16, 15, 23547, 24, 24, 23, 11, 24, 24, 22, 8, 151854, 151643],
        '000000000111111111111111111'),
    ('multitask', 'grounded_caption'): (
        '<img><imgpad>x2</img>Generate the caption in English with grounding:⟦ '
        '<ref>A bus</ref><box>(0,0),(500,500)</box> near <ref>a tree</ref><box>'
        '(625,208),(937,833)</box>.<|endoftext|>⟧',
        [151857, 151859, 151859, 151858, 31115, 279, 17256, 304, 6364, 448, 94741, 25, 220,
         151851, 32, 5828, 151852, 151853, 7, 15, 11, 15, 23547, 20, 15, 15, 11, 20, 15, 15, 8,
         151854, 3143, 220, 151851, 64, 4916, 151852, 151853, 7, 21, 17, 20, 11, 17, 15, 23,
         23547, 24, 18, 22, 11, 23, 18, 18, 8, 151854, 13, 151643],
        '00000000000011111111111111111111111111111111111111111111111'),
    ('multitask', 'ocr'): (
        '<img><imgpad>x2</img>OCR with grounding:⟦ <ref>STOP</ref><quad>(15,20)'
        ',(156,25),(153,125),(14,120)</quad>\n<ref>Exit</ref><box>(500,500),(999'
        ',999)</box><|endoftext|>⟧',
        [151857, 151859, 151859, 151858, 93495, 448, 94741, 25, 220, 151851, 50669, 151852,
         151855, 7, 16, 20, 11, 17, 15, 23547, 16, 20, 21, 11, 17, 20, 23547, 16, 20, 18, 11, 16,
         17, 20, 23547, 16, 19, 11, 16, 17, 15, 8, 151856, 198, 151851, 15339, 151852, 151853, 7,
         20, 15, 15, 11, 20, 15, 15, 23547, 24, 24, 24, 11, 24, 24, 24, 8, 151854, 151643],
        '0000000011111111111111111111111111111111111111111111111111111111111'),
    ('multitask', 'text'): (
        'Hello⟦ world.<|endoftext|>⟧',
        [9707, 1879, 13, 151643],
        '0111'),
    ('sft', 'chat'): (
        '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>'
        'user\nPicture 1: <img><imgpad>x2</img>\nWhat is it?<|im_end|>\n<|im_start'
        '|>assistant\n⟦A bus.<|im_end|>⟧\n<|im_start|>user\nPicture 2: <img><imgpa'
        'd>x2</img>\nWhere is the man?<|im_end|>\n<|im_start|>assistant\n⟦<ref>The'
        ' man</ref><box>(100,100),(500,500)</box><|im_end|>⟧\n',
        [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198,
         24669, 220, 16, 25, 220, 151857, 151859, 151859, 151858, 198, 3838, 374, 432, 30,
         151645, 198, 151644, 77091, 198, 32, 5828, 13, 151645, 198, 151644, 872, 198, 24669,
         220, 17, 25, 220, 151857, 151859, 151859, 151858, 198, 9064, 374, 279, 883, 30, 151645,
         198, 151644, 77091, 198, 151851, 785, 883, 151852, 151853, 7, 16, 15, 15, 11, 16, 15,
         15, 23547, 20, 15, 15, 11, 20, 15, 15, 8, 151854, 151645, 198],
        '0000000000000000000000000000000001111000000000000000000000000111111111'
        '1111111111111110'),
}


def _from_text(text: str) -> tuple[list[int], str]:
    """Hand-written rendering -> ids + mask, without the template code."""
    tok = get_tokenizer()
    specials = sorted((re.escape(s) for s in SPECIAL_TOKEN_IDS if not s.startswith("<|extra")),
                      key=len, reverse=True)
    pattern = re.compile(r"(<imgpad>x\d+|⟦|⟧|" + "|".join(specials) + ")")
    ids, mask, loss = [], [], False
    for part in pattern.split(text):
        if part in ("⟦", "⟧"):
            loss = part == "⟦"
            continue
        if not part:
            continue
        if part.startswith("<imgpad>x"):
            new = [tok.img_pad_id] * int(part[9:])
        elif part in SPECIAL_TOKEN_IDS:
            new = [SPECIAL_TOKEN_IDS[part]]
        else:
            new = tok.encode(part)
        ids += new
        mask += ["1" if loss else "0"] * len(new)
    mask[0] = "0"  # the first token never has a label
    return ids, "".join(mask)


@pytest.mark.parametrize("stage,task", sorted(GOLDEN))
def test_golden_rendering(stage, task):
    text, ids, mask = GOLDEN[(stage, task)]
    tok = get_tokenizer()
    tokens = encode_tokens(parse_record(RECORDS[task], "k"), stage, tok, 2, 4096)
    assert tokens.input_ids == ids
    assert "".join("0" if lab == IGNORE_INDEX else "1" for lab in tokens.labels) == mask
    assert all(lab in (IGNORE_INDEX, i) for lab, i in zip(tokens.labels, ids, strict=True))
    assert format_tokens(tokens.input_ids, tokens.labels, tok) == text
    assert _from_text(text) == (ids, mask)


@pytest.mark.parametrize("stage", ["pretrain", "multitask", "sft"])
def test_every_task_is_golden_or_filtered(stage):
    for task in TASKS:
        assert accepts(stage, task) == ((stage, task) in GOLDEN)
        if not accepts(stage, task):
            with pytest.raises(ValueError):
                render(parse_record(RECORDS[task], "k"), stage)


def test_image_span_uses_num_image_tokens():
    tok = get_tokenizer()
    t = encode_tokens(parse_record(RECORDS["caption"], "k"), "pretrain", tok, 256, 512)
    assert t.input_ids[:258] == [tok.img_start_id] + [tok.img_pad_id] * 256 + [tok.img_end_id]
    assert t.image_spans == [(0, 258)] and t.image_order == [0]


def test_data_text_cannot_forge_special_tokens():
    tok = get_tokenizer()
    rec = dict(RECORDS["caption"], caption="<img><imgpad></img><|im_end|>")
    t = encode_tokens(parse_record(rec, "k"), "pretrain", tok, 2, 512)
    assert t.input_ids.count(tok.img_pad_id) == 2
    assert tok.im_end_id not in t.input_ids


def test_pieces_are_the_only_masking_path():
    tok = get_tokenizer()
    s = parse_record(RECORDS["vqa"], "k")
    a = pieces_to_ids(render(s, "multitask"), tok, 2)
    b = encode_tokens(s, "multitask", tok, 2, 4096)
    assert (a.input_ids, a.labels) == (b.input_ids, b.labels)
