"""qwenvl-chat: prompts (ChatML through the training template, base-model prompts equal to
the evaluation's), batch answers with boxes mapped back to original-image pixels and drawn
there, streaming (whole characters, equal to the non-streamed answer), KV-cached generation
on a multi-image chat prompt against a naive loop, both export layouts, user errors.

The model is a random tiny one; where an answer must hold boxes, a logits processor forces
the generated tokens, so the test checks everything after the sampler: stopping, decoding,
parsing, pixel mapping, drawing and the JSONL."""

from __future__ import annotations

import json

import pytest
import torch
from model_helpers import released_ckpt, tiny_config
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import LogitsProcessor

from qwenvl_train.chat import batch as chat_batch
from qwenvl_train.chat.loading import load_for_chat
from qwenvl_train.chat.prompt import ChatError
from qwenvl_train.chat.session import ChatSession, GenerationOptions
from qwenvl_train.chat.stream import TextStream
from qwenvl_train.cli import chat as chat_cli
from qwenvl_train.data.draw import PALETTE
from qwenvl_train.data.encode import pieces_to_ids
from qwenvl_train.data.images import load_image
from qwenvl_train.data.records import parse_record
from qwenvl_train.data.templates import Special, box_text, render
from qwenvl_train.data.tokenizer import IM_START, get_tokenizer
from qwenvl_train.eval.parse import box_to_pixels
from qwenvl_train.eval.run_eval import prompt_pieces
from qwenvl_train.model.qwenvl import build_model
from qwenvl_train.model.weights import export_consolidated

IMAGE_SIZE = 28
TOK = get_tokenizer()
SIZE_A, SIZE_B = (400, 300), (320, 280)  # >= 256 px: drawn at scale 1
GREY_B = (90, 90, 90)
TRUE_BOX = (40.0, 56.0, 200.0, 252.0)  # pixels of image b


class ForceTokens(LogitsProcessor):
    """Makes greedy decoding emit `ids` (then keep emitting the last one)."""

    def __init__(self, ids: list[int]):
        self.ids = ids

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1]  # generation from embeddings: only the new ids are here
        out = torch.full_like(scores, float("-inf"))
        out[:, self.ids[min(step, len(self.ids) - 1)]] = 0.0
        return out


def forced(text: str, end: int = TOK.im_end_id) -> list[ForceTokens]:
    return [ForceTokens(TOK.encode(text, allow_special=True) + [end])]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    torch.manual_seed(0)
    cfg = tiny_config()
    m = build_model(cfg, IMAGE_SIZE)
    with torch.no_grad():  # a peakier random LM: argmax margins well above float noise
        for p in m.llm.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    return export_consolidated(m, cfg, tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def model(export):
    return load_for_chat(export, image_size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    Image.new("RGB", SIZE_A, (200, 200, 200)).save(d / "a.png")
    Image.new("RGB", SIZE_B, GREY_B).save(d / "b.png")
    return d


def _session(model, tmp_path, **kw) -> ChatSession:
    return ChatSession(model, box_dir=tmp_path / "boxes", **kw)


# ---------------------------------------------------------------- batch + boxes

def test_batch_grounding_on_two_images_maps_boxes_back_to_pixels(model, images, tmp_path):
    box_1000 = box_text(TRUE_BOX, SIZE_B)  # what the training encoder writes for TRUE_BOX
    assert box_1000 == "(125,200),(625,900)"
    text = f"<ref>the red square</ref><box>{box_1000}</box>"
    jsonl = images / "batch.jsonl"
    jsonl.write_text(json.dumps({"id": "grd/1", "images": ["a.png", "b.png"],
                                 "text": "Where is the red square?"}) + "\n")
    session = _session(model, tmp_path, logits_processor=forced(text),
                       options=GenerationOptions(max_new_tokens=40))
    out = tmp_path / "answers.jsonl"
    with open(out, "w") as f:
        chat_batch.run_batch(session, chat_batch.read_batch(jsonl), f, images)
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]

    prompt = TOK.decode(session.last_prompt)  # two pictures, ChatML, as in training
    assert session.last_prompt.count(TOK.img_pad_id) == 2 * model.num_queries
    assert "Picture 1: <img>" in prompt and "Picture 2: <img>" in prompt
    assert prompt.endswith("Where is the red square?<|im_end|>\n<|im_start|>assistant\n")

    assert row["id"] == "grd/1" and row["answer"] == text  # cut before <|im_end|>
    (g,) = row["grounding"]
    assert g["ref"] == "the red square" and g["boxes_1000"] == [[125, 200, 625, 900]]
    assert row["image"] == str(images / "b.png")  # the latest picture
    px = g["boxes"][0]
    assert px == pytest.approx(list(box_to_pixels((125, 200, 625, 900), SIZE_B)))
    assert all(abs(a - b) <= side / 2000 + 1e-9 for a, b, side in
               zip(px, TRUE_BOX, SIZE_B * 2, strict=True))

    # The drawn outline sits exactly on the outermost pixels of the true box, on image b.
    drawn = Image.open(row["box_image"]).convert("RGB")
    x1, y1, x2, y2 = (int(c) for c in TRUE_BOX)
    colour = PALETTE[0]
    ymid, xmid = (y1 + y2) // 2, (x1 + x2) // 2
    assert drawn.getpixel((x1, ymid)) == colour and drawn.getpixel((x2 - 1, ymid)) == colour
    assert drawn.getpixel((xmid, y2 - 1)) == colour and drawn.getpixel((xmid + 40, y1)) == colour
    for outside in [(x1 - 1, ymid), (x2, ymid), (xmid, y2), (xmid + 40, y1 - 1)]:
        assert drawn.getpixel(outside) == GREY_B, outside
    assert drawn.getpixel((x1 + 10, ymid)) == GREY_B  # outline only
    assert drawn.getpixel((SIZE_B[0] + 5, 5)) == (255, 255, 255)  # image a is not drawn


def test_multi_turn_prompt_is_the_training_template(model, images, tmp_path):
    answer = f"<ref>the red square</ref><box>{box_text(TRUE_BOX, SIZE_B)}</box>"
    session = _session(model, tmp_path, logits_processor=forced(answer),
                       options=GenerationOptions(max_new_tokens=40))
    first = session.ask("<img>b.png</img> Where is the red square?", base_dir=images)
    assert first.text == answer
    session.ask("<img>a.png</img>And in this one?", base_dir=images)
    def user(image: int, text: str) -> dict:
        return {"role": "user", "content": [{"type": "image", "image": image},
                                            {"type": "text", "text": text}]}

    box = {"type": "box", "ref": "the red square", "image": 0, "boxes": [TRUE_BOX]}
    record = {"task": "chat", "source": "t",
              "images": [{"width": w, "height": h} for w, h in (SIZE_B, SIZE_A)],
              "messages": [user(0, "Where is the red square?"),
                           {"role": "assistant", "content": [box]},
                           user(1, "And in this one?"),
                           {"role": "assistant", "content": [{"type": "text", "text": "x"}]}]}
    pieces = render(parse_record(record, "k"), "sft")
    # The template's pieces up to turn 2's answer: <|im_start|> "assistant\n" "x" <|im_end|> "\n"
    assert pieces[-5:-3] == [(Special(IM_START), False), ("assistant\n", False)]
    want = pieces_to_ids(pieces[:-3], TOK, model.num_queries).input_ids
    assert session.last_prompt == want


def test_base_mode_sends_the_evaluation_prompt(model, images, tmp_path):
    session = _session(model, tmp_path, mode="base", options=GenerationOptions(max_new_tokens=30),
                       logits_processor=forced("(125,200),(625,900)", end=TOK.box_end_id))
    ans = session.ask("<img>b.png</img><ref>the red square</ref><box>", base_dir=images)
    want = pieces_to_ids(prompt_pieces("grounding", "the red square"), TOK,
                         model.num_queries).input_ids
    assert session.last_prompt == want  # exactly what qwenvl-eval sends
    assert ans.text == "(125,200),(625,900)"  # stopped at </box>
    assert ans.grounding[0]["ref"] == "the red square"
    assert ans.grounding[0]["boxes_1000"] == [[125, 200, 625, 900]] and ans.box_image
    # A follow-up continues the text after a newline, the answer's </box> put back.
    session.logits_processor = forced(" yes", end=TOK.eod_id)
    session.ask("Is it red? Answer:")
    assert session.last_prompt == want + TOK.encode("(125,200),(625,900)") + [
        TOK.box_end_id] + TOK.encode("\nIs it red? Answer:")


def test_chinese_round_trip(model, images, tmp_path):
    text = "图中<ref>红色的方块</ref><box>(125,200),(625,900)</box>在右边。"
    pieces: list[str] = []
    session = _session(model, tmp_path, logits_processor=forced(text),
                       options=GenerationOptions(max_new_tokens=60))
    ans = session.ask("<img>b.png</img>红色的方块在哪里？", base_dir=images, on_text=pieces.append)
    assert "红色的方块在哪里？<|im_end|>" in TOK.decode(session.last_prompt)
    assert ans.text == text and "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert ans.grounding[0]["ref"] == "红色的方块"


# ---------------------------------------------------------------- generation

def test_streaming_equals_non_streaming(model, images, tmp_path):
    for mode in ("chat", "base"):
        runs = []
        for stream in (False, True):
            pieces: list[str] = []
            s = _session(model, tmp_path, mode=mode, options=GenerationOptions(max_new_tokens=16))
            ans = s.ask("<img>a.png</img>你好，这是什么？", base_dir=images,
                        on_text=pieces.append if stream else None)
            runs.append(ans.text)
            if stream:
                assert "".join(pieces) == ans.text and len(pieces) > 1
        assert runs[0] == runs[1] and runs[0]


def test_stream_hands_out_whole_characters_and_stops():
    text = "彧龘 ok 你好<ref>猫</ref>"
    ids = TOK.encode(text, allow_special=True)
    assert any("\ufffd" in TOK.decode([t]) for t in ids)  # some token splits a character
    pieces: list[str] = []
    stream = TextStream(TOK, [TOK.im_end_id], pieces.append)
    stream.put(torch.tensor([[]]))  # the prompt
    for t in ids + [TOK.im_end_id, TOK.encode("x")[0]]:
        stream.put(torch.tensor([t]))
    stream.end()
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    pieces.clear()
    stream = TextStream(TOK, [TOK.eod_id], pieces.append, stop_strings=["\n"])
    stream.put(torch.tensor([[]]))
    for t in TOK.encode(" yes\nWhat is"):
        stream.put(torch.tensor([t]))
    stream.end()
    assert "".join(pieces) == " yes"


def test_kv_cache_generation_equals_full_forward_on_a_chat_prompt(model, images, tmp_path):
    steps = 10
    s = _session(model, tmp_path, options=GenerationOptions(max_new_tokens=steps))
    ans = s.ask("<img>a.png</img><img>b.png</img>Compare them.", base_dir=images)
    pix = torch.stack([load_image((images / n).read_bytes(), IMAGE_SIZE)
                       for n in ("a.png", "b.png")])
    ids, new = list(s.last_prompt), []
    with torch.no_grad():  # no cache: the whole sequence through the model for every token
        for _ in range(steps):
            logits = model(torch.tensor([ids]), pix).logits[0, -1, :TOK.vocab_size]
            nxt = int(logits.argmax())
            if nxt in (TOK.eod_id, TOK.im_end_id):
                break
            new.append(nxt)
            ids.append(nxt)
    assert ans.text == TOK.decode(new)


def test_sampling_is_seeded(model, images, tmp_path):
    opts = GenerationOptions(max_new_tokens=8, temperature=0.8, top_p=0.9, top_k=20, seed=7)
    a, b = (_session(model, tmp_path, options=opts).ask("<img>a.png</img>Hi", base_dir=images)
            for _ in range(2))
    greedy = _session(model, tmp_path, options=GenerationOptions(max_new_tokens=8)).ask(
        "<img>a.png</img>Hi", base_dir=images)
    assert a.text == b.text and a.text != greedy.text


# ---------------------------------------------------------------- loading, CLI

def test_load_for_chat_reads_both_layouts(model, export, tmp_path):
    saved = load_file(str(export / "model.safetensors"))
    for name, t in model.state_dict().items():  # ours
        assert torch.equal(t, saved[name]), name
    cfg = tiny_config()
    sd = released_ckpt(cfg, torch.Generator().manual_seed(3))
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "qwen", "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 2 * 96, "vocab_size": 151936,
        "max_position_embeddings": 512, "rotary_emb_base": 10000, "layer_norm_epsilon": 1e-6,
        "visual": {"width": 48, "layers": 2, "heads": 4, "mlp_ratio": 4.0, "patch_size": 14,
                   "output_dim": 64, "image_size": 56, "n_queries": 16, "attn_pool_heads": 4}}))
    released = load_for_chat(tmp_path)  # load_qwenvl checks every name and shape
    assert released.image_size == 56
    for part in ("vision", "adapter", "llm"):
        assert getattr(released.config, part) == getattr(cfg, part), part
    assert torch.equal(released.llm.lm_head.weight, sd["lm_head.weight"])


def test_cli_batch_answers_conversations(export, model, images, tmp_path, capsys):
    jsonl = images / "conv.jsonl"
    conv = {"id": "c", "messages": [
        {"role": "system", "content": "你是一个有用的助手。"},
        {"role": "user", "content": "<img>a.png</img>这是什么？"},
        {"role": "assistant", "content": "一个<ref>方块</ref><box>(1,2),(300,400)</box>"},
        {"role": "user", "content": "<img>b.png</img>这个呢？"}]}
    jsonl.write_text(json.dumps(conv, ensure_ascii=False) + "\n"
                     + json.dumps({"text": "Hello"}) + "\n")
    out = tmp_path / "out.jsonl"
    rc = chat_cli.main([str(export), "--batch", str(jsonl), "--out", str(out),
                        "--max-new-tokens", "6", "--image-size", str(IMAGE_SIZE),
                        "--box-dir", str(tmp_path / "b")])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == ["c", "2"]
    s = _session(model, tmp_path, options=GenerationOptions(max_new_tokens=6),
                 system="你是一个有用的助手。")
    s.add_history("<img>a.png</img>这是什么？", conv["messages"][2]["content"], base_dir=images)
    assert rows[0]["answer"] == s.ask("<img>b.png</img>这个呢？", base_dir=images).text
    assert "<|im_start|>system\n你是一个有用的助手。<|im_end|>" in TOK.decode(s.last_prompt)
    assert TOK.decode(s.last_prompt).count("Picture 2: <img>") == 1


@pytest.mark.parametrize("args, lines, message", [
    (["--top-p", "0.5"], None, "--temperature > 0"),
    ([], ['{"text": "hi"}', '{"images": ["missing.png"], "text": "x"}'],
     "line 2: image 'missing.png'"),
    ([], ['{"messages": [{"role": "assistant", "content": "x"}]}'], "line 1: roles must alternate"),
    ([], ["not json"], "line 1: not JSON"),
])
def test_cli_user_errors_stop_before_loading(export, images, tmp_path, monkeypatch, capsys,
                                             args, lines, message):
    def no_load(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(chat_cli, "load_for_chat", no_load)
    if lines is not None:
        (images / "bad.jsonl").write_text("\n".join(lines) + "\n")
        args = args + ["--batch", str(images / "bad.jsonl")]
    assert chat_cli.main([str(export), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qwenvl-chat: ") and message in err and "Traceback" not in err


def test_console_session(model, images, tmp_path, monkeypatch, capsys):
    text = f"<ref>the red square</ref><box>{box_text(TRUE_BOX, SIZE_B)}</box>"
    lines = iter([f"<img>{images / 'b.png'}</img>Where is the red square?", "/clear", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    s = _session(model, tmp_path, logits_processor=forced(text),
                 options=GenerationOptions(max_new_tokens=40))
    assert chat_cli.interactive(s, stream=True) == 0
    out = capsys.readouterr().out
    assert f"assistant> {text}\n" in out  # streamed, then the boxes in pixels of image b
    assert "  [the red square] (40.2,56.1)-(200.2,252.1) px\n" in out
    assert f"  boxes drawn on {images / 'b.png'}: {tmp_path / 'boxes'}" in out
    assert "(new conversation)" in out and s.conv.turns == []


def test_cli_refuses_a_directory_without_an_export(tmp_path, capsys):
    assert chat_cli.main([str(tmp_path)]) == 2
    assert "neither a consolidated export" in capsys.readouterr().err


class Interrupt(LogitsProcessor):
    def __call__(self, input_ids, scores):
        raise KeyboardInterrupt


def test_a_failed_message_leaves_the_conversation_unchanged(model, images, tmp_path):
    s = _session(model, tmp_path, options=GenerationOptions(max_new_tokens=4))
    s.ask("<img>a.png</img>Hi", base_dir=images)
    before = (list(s.conv.turns), list(s.conv.images))
    with pytest.raises(ChatError, match="empty message"):
        s.ask("   ")
    with pytest.raises(ChatError, match="no such file"):
        s.ask("<img>b.png</img><img>nope.png</img>hi", base_dir=images)
    s.options.max_new_tokens = 500  # tiny_config has 512 positions
    with pytest.raises(ChatError, match="passes the model's 512 positions"):
        s.ask("<img>b.png</img>hi", base_dir=images)
    s.options.max_new_tokens = 4
    s.logits_processor = [Interrupt()]  # Ctrl-C during an answer
    with pytest.raises(KeyboardInterrupt):
        s.ask("<img>b.png</img>hi", base_dir=images)
    assert (s.conv.turns, s.conv.images) == before
