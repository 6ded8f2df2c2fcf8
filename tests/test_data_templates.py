"""Box normalisation, ChatML masking of multi-turn multi-image dialogues, truncation."""

from __future__ import annotations

import pytest

from qwenvl_train.data.encode import Tokens, encode_tokens, truncate
from qwenvl_train.data.inspect import format_tokens
from qwenvl_train.data.records import parse_record
from qwenvl_train.data.schema import SampleError
from qwenvl_train.data.templates import box1000_text, box_text, norm_coord, quad_text
from qwenvl_train.data.tokenizer import get_tokenizer
from qwenvl_train.tokens import IGNORE_INDEX


@pytest.mark.parametrize("coord,side,expected", [
    (0, 640, 0),
    (639, 640, 998),        # side - 1
    (640, 640, 999),        # side itself -> 1000 -> clamped
    (0.64, 640, 1),         # floats: int() truncates
    (320.5, 640, 500),
    (1.9999, 1000, 1),
    (-0.5, 640, 0),         # within the writer's tolerance, clamped
    (641, 640, 999),
    (1, 3, 333),
    (2, 3, 666),
    (479, 480, 997),
])
def test_norm_coord(coord, side, expected):
    assert norm_coord(coord, side) == expected


def test_box_and_quad_text_use_original_size():
    assert box_text((0, 0, 640, 480), (640, 480)) == "(0,0),(999,999)"
    assert box_text((64, 48, 128, 96), (640, 480)) == "(100,100),(200,200)"
    # x uses the width, y the height
    assert box_text((10, 10, 10, 10), (100, 1000)) == "(100,10),(100,10)"
    assert quad_text([(0, 0), (50, 0), (50, 10), (0, 10)], (100, 20)) == \
        "(0,0),(500,0),(500,500),(0,500)"
    assert box1000_text((0, 5, 999, 1000)) == "(0,5),(999,999)"


def _chat(messages, images):
    rec = {"task": "chat", "source": "s", "images": images, "messages": messages}
    tok = get_tokenizer()
    t = encode_tokens(parse_record(rec, "k"), "sft", tok, 1, 4096)
    return t, format_tokens(t.input_ids, t.labels, tok)


def _user(*parts):
    return {"role": "user", "content": list(parts)}


def _asst(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def _img(i):
    return {"type": "image", "image": i}


def _txt(t):
    return {"type": "text", "text": t}


def test_chatml_multi_turn_multi_image_masking():
    ims = [{"width": 10, "height": 10}] * 3
    t, text = _chat([
        {"role": "system", "content": [_txt("Be brief.")]},
        _user(_txt("Compare "), _img(1), _img(0)),
        _asst("Same."),
        _user(_img(2), _txt("And this?")),
        _asst("Different."),
    ], ims)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nCompare Picture 1: <img><imgpad>x1</img>\n"
        "Picture 2: <img><imgpad>x1</img>\n<|im_end|>\n"
        "<|im_start|>assistant\n⟦Same.<|im_end|>⟧\n"
        "<|im_start|>user\nPicture 3: <img><imgpad>x1</img>\nAnd this?<|im_end|>\n"
        "<|im_start|>assistant\n⟦Different.<|im_end|>⟧\n")
    # images come in order of appearance (dialogue order), not record order
    assert t.image_order == [1, 0, 2]
    tok = get_tokenizer()
    # loss tokens are exactly the assistant contents + their <|im_end|>
    loss_ids = [i for i, lab in zip(t.input_ids, t.labels, strict=True) if lab != IGNORE_INDEX]
    assert loss_ids == tok.encode("Same.") + [tok.im_end_id] + tok.encode("Different.") + \
        [tok.im_end_id]


def test_chatml_default_system_and_text_only():
    t, text = _chat([_user(_txt("Hi")), _asst("Hello!")], [])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert t.image_order == []
    assert text.endswith("<|im_start|>assistant\n⟦Hello!<|im_end|>⟧\n")


@pytest.mark.parametrize("bad", [
    [_user(_txt("Hi"))],                                            # no assistant turn
    [_user(_txt("Hi")), {"role": "assistant", "content": [_img(0)]}],  # image in answer
    [_user(_txt("Hi")), _asst("x"), {"role": "system", "content": [_txt("late")]}],
    [{"role": "bot", "content": [_txt("x")]}],
])
def test_bad_dialogues_are_bad_record(bad):
    rec = {"task": "chat", "source": "s", "images": [{"width": 4, "height": 4}],
           "messages": bad}
    with pytest.raises(SampleError) as e:
        parse_record(rec, "k")
    assert e.value.reason == "bad_record"


def _tokens(n_text_before, n_img, n_text_after, loss_after=True):
    ids = [1] * n_text_before + [2] * n_img + [3] * n_text_after
    after = [3] if loss_after else [IGNORE_INDEX]
    labels = [IGNORE_INDEX] * (n_text_before + n_img) + after * n_text_after
    spans = [(n_text_before, n_text_before + n_img)] if n_img else []
    return Tokens(ids, labels, [0] if n_img else [], spans)


def test_truncation_cuts_trailing_text_only():
    t = truncate(_tokens(2, 5, 20), 10)
    assert len(t.input_ids) == 10 and t.image_spans == [(2, 7)]


def test_truncation_never_cuts_an_image():
    with pytest.raises(SampleError) as e:
        truncate(_tokens(2, 10, 5), 8)
    assert e.value.reason == "too_long"


def test_truncation_without_loss_left_is_too_long():
    with pytest.raises(SampleError) as e:
        truncate(_tokens(8, 0, 8), 6)
    assert e.value.reason == "too_long"


def test_real_sample_too_long():
    rec = {"task": "caption", "source": "s", "images": [{"width": 4, "height": 4}],
           "caption": "word " * 50}
    tok = get_tokenizer()
    s = parse_record(rec, "k")
    assert len(encode_tokens(s, "pretrain", tok, 4, 20).input_ids) == 20
    with pytest.raises(SampleError):
        encode_tokens(s, "pretrain", tok, 256, 200)  # the image span alone needs 258


def test_plain_ocr_renders_the_full_text_with_loss():
    """An ocr record without regions (a source without line geometry) is plain OCR."""
    tok = get_tokenizer()
    rec = {"task": "ocr", "source": "s", "images": [{"width": 40, "height": 20}],
           "text": "第一行\nline two"}
    t = encode_tokens(parse_record(rec, "k", {0}), "multitask", tok, 1, 64)
    assert format_tokens(t.input_ids, t.labels, tok) == (
        "<img><imgpad>x1</img>OCR:⟦ 第一行\nline two<|endoftext|>⟧")
    both = {**rec, "regions": [{"text": "a", "box": [0, 0, 5, 5]}]}
    with pytest.raises(SampleError, match="not both"):
        parse_record(both, "k", {0})
