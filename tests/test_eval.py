"""Evaluation: KV-cached batched generation vs a naive loop, box parsing against the
encoder's normalisation, VQA / grounding / CIDEr-D / chat metrics, chat items (ChatML up to
each assistant turn), evaluate() end to end and `qwenvl-eval` on exports, run directories
and chat shards."""

from __future__ import annotations

import io
import json
import random
import re

import pytest
import torch
from model_helpers import tiny_config
from PIL import Image

from qwenvl_train.cli import eval as eval_cli
from qwenvl_train.data.encode import pieces_to_ids
from qwenvl_train.data.schema import ChatSample, Message, Part
from qwenvl_train.data.shards import ShardWriter
from qwenvl_train.data.templates import box_text, chat_prompt, norm_coord, quad_text
from qwenvl_train.data.tokenizer import get_tokenizer
from qwenvl_train.eval import run_eval
from qwenvl_train.eval.generate import StopOnStrings, cut_at_strings, generate_ids, stop_ids
from qwenvl_train.eval.metrics import (
    cider_d,
    exact_match,
    grounding_hit,
    iou,
    normalize_answer,
    token_f1,
    vqa_score,
)
from qwenvl_train.eval.parse import (
    box_to_pixels,
    denorm_coord,
    parse_boxes,
    parse_grounding,
    quad_to_pixels,
)
from qwenvl_train.model.qwenvl import build_model

IMAGE_SIZE = 28
TOK = get_tokenizer()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(tiny_config(), IMAGE_SIZE).eval()
    with torch.no_grad():  # a peakier random LM: argmax margins well above float noise
        for p in m.llm.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    return m


def _image_span(m) -> list[int]:
    return [TOK.img_start_id] + [TOK.img_pad_id] * m.num_queries + [TOK.img_end_id]


def _naive_greedy(m, prompt: list[int], image: torch.Tensor | None, steps: int,
                  eos: list[int]) -> list[int]:
    """Full forward over the whole sequence for every new token, one row, no padding."""
    ids, new = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(m(torch.tensor([ids]), image).logits[0, -1].argmax())
            if nxt in eos:
                break
            new.append(nxt)
            ids.append(nxt)
    return new


# ---------------------------------------------------------------- generation

def test_greedy_generation_matches_naive_loop(model):
    span = _image_span(model)
    prompts = [span + TOK.encode("Describe the image in English:"),
               span + TOK.encode("What colour is the big square? Answer:"),
               TOK.encode("A text-only row")]  # rows of different lengths -> left padding
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    per_row = [images[0:1], images[1:2], None]
    eos = stop_ids(TOK)
    steps = 8
    got = generate_ids(model, prompts, images, TOK, max_new_tokens=steps)
    want = [_naive_greedy(model, p, im, steps, eos)
            for p, im in zip(prompts, per_row, strict=True)]
    assert got == want
    # An eos id met by row 0 stops that row only; the others continue unchanged (a greedy
    # run with one more eos id is the plain run cut at that id's first occurrence).
    extra = want[0][4]
    got = generate_ids(model, prompts, images, TOK, max_new_tokens=steps, eos_ids=eos + [extra])
    assert got == [w[:w.index(extra)] if extra in w else w for w in want]
    assert len(got[0]) <= 4


def test_sampling_is_seeded_and_bounded(model):
    prompt = [_image_span(model) + TOK.encode("Describe the image in English:")]
    image = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(generate_ids(model, prompt, image, TOK, max_new_tokens=6, do_sample=True,
                                 top_p=0.9, temperature=0.7))
    assert runs[0] == runs[1] and len(runs[0][0]) <= 6


def test_stop_strings():
    assert cut_at_strings("yes\nWhat is", ["\n"]) == "yes"
    assert cut_at_strings("no stop here", ["\n", "</box>"]) == "no stop here"
    a, b = TOK.encode("red\nblue"), TOK.encode("red blue")
    n = max(len(a), len(b))
    ids = torch.tensor([r + [TOK.eod_id] * (n - len(r)) for r in (a, b)])
    assert StopOnStrings(TOK, ["\n"], 0)(ids, None).tolist() == [True, False]


# ---------------------------------------------------------------- parsing

@pytest.mark.parametrize("side", [1, 7, 333, 480, 640, 1000, 1333, 4096])
def test_coordinate_round_trip(side):
    # decode(encode(c)) lands within half a bin of c, edges included ...
    coords = [0, 0.4, side / 2, side - 1, side - 0.01, side]
    coords += [random.Random(side).uniform(0, side) for _ in range(200)]
    for c in coords:
        v = norm_coord(c, side)
        assert 0 <= v <= 999
        assert abs(denorm_coord(v, side) - c) <= side / 2000 + 1e-9, (c, v)
    # ... and encode(decode(v)) is exactly v.
    assert all(norm_coord(denorm_coord(v, side), side) == v for v in range(1000))


def test_box_and_quad_parsing_round_trip():
    size = (640, 480)  # non-square: x and y use their own side
    box = (0.0, 0.0, 639.0, 479.0)
    text = f"<ref>the cat</ref><box>{box_text(box, size)}</box>"
    assert text.endswith("<box>(0,0),(998,997)</box>")
    (g,) = parse_grounding(text)
    assert g.ref == "the cat" and g.boxes == [(0, 0, 998, 997)]
    px = box_to_pixels(g.boxes[0], size)
    assert all(abs(a - b) <= 0.5 for a, b in zip(px, box, strict=True))
    assert iou(px, box) > 0.99
    # several boxes for one ref, a quad, and a box cut off before its closing tag
    quad = [(10.0, 20.0), (600.0, 20.0), (600.0, 470.0), (10.0, 470.0)]
    text = ("<ref>a</ref><box>(1,2),(3,4)</box><box>(5,6),(7,8)</box> then "
            f"<ref>word</ref><quad>{quad_text(quad, size)}</quad> <box>(9,9),(10,11)")
    items = parse_grounding(text)
    assert [(i.ref, i.boxes) for i in items] == [
        ("a", [(1, 2, 3, 4), (5, 6, 7, 8)]), ("word", []), (None, [(9, 9, 10, 11)])]
    assert all(abs(a - b) <= 0.5 for p, q in zip(quad_to_pixels(items[1].quad, size), quad,
                                                 strict=True)
               for a, b in zip(p, q, strict=True))
    assert parse_boxes("no box here (1,2),(3,4)") == []


# ---------------------------------------------------------------- metrics

def test_answer_normalisation():
    assert normalize_answer("The Two dogs.") == "2 dogs"
    assert normalize_answer("Dont") == normalize_answer("don't") == "don't"
    assert normalize_answer(" 1,000 ") == "1000"
    assert normalize_answer("3.5") == "3.5"
    assert normalize_answer("Yes!") == "yes"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert normalize_answer("black/white") == "black white"


def test_vqa_accuracy():
    humans = ["2"] * 3 + ["3"] * 7
    assert vqa_score("two", humans) == 1.0
    assert vqa_score("2", ["2", "2"] + ["3"] * 8) == pytest.approx(2 / 3)
    assert vqa_score("2", ["2"] + ["3"] * 9) == pytest.approx(1 / 3)
    assert vqa_score("4", humans) == 0.0
    assert vqa_score("Yes.", ["yes"]) == 1.0  # one stored reference: exact match
    # official 10-annotator averaging: 3 of the 10 subsets lose a match -> 2/3 there
    assert vqa_score("2", humans, leave_one_out=True) == pytest.approx((3 * 2 / 3 + 7) / 10)
    assert exact_match("The cat", "cat") == 1.0 and exact_match("cats", "cat") == 0.0


def test_token_f1():
    assert token_f1("The red circle.", "a red circle") == 1.0  # normalised: articles, case
    # 2 of 3 predicted words in a 4-word reference: P = 2/3, R = 2/4
    assert token_f1("red big square", "a red square on the left") == pytest.approx(
        2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))
    assert token_f1("two two", "two") == pytest.approx(2 * 0.5 * 1 / 1.5)  # counts clipped
    assert token_f1("", "") == 1.0 and token_f1("", "x") == 0.0 and token_f1("x", "y") == 0.0


def test_iou_and_grounding_accuracy():
    a = (0.0, 0.0, 10.0, 10.0)
    assert iou(a, a) == 1.0
    assert iou(a, (20, 20, 30, 30)) == 0.0
    assert iou(a, (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou(a, (0, 0, 10, 5)) == pytest.approx(0.5)
    assert iou((3, 3, 3, 3), (3, 3, 3, 3)) == 0.0  # degenerate boxes
    assert grounding_hit((0, 0, 10, 5), [a]) == (True, 0.5)  # threshold is inclusive
    assert grounding_hit((5, 0, 15, 10), [a])[0] is False
    assert grounding_hit((5, 0, 15, 10), [(20, 20, 30, 30), (5, 0, 14, 10)])[0] is True
    assert grounding_hit(None, [a]) == (False, 0.0)


def test_cider_d():
    refs = [["a red circle on the left"], ["two blue squares at the top"],
            ["a green triangle in the middle"]]
    perfect = cider_d([r[0] for r in refs], refs)
    assert perfect > 5.0
    assert cider_d(["a blue circle", "red things", "a triangle"], refs) < perfect
    assert cider_d(["zzz", "zzz", "zzz"], refs) == 0.0


# ---------------------------------------------------------------- evaluate() end to end

def _png(w: int, h: int, seed: int) -> bytes:
    img = Image.new("RGB", (w, h), (seed * 40 % 256, 90, 200))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


VQA = [("How many dogs?", "2", None), ("What colour is it?", "red", ["red", "Red.", "red", "blue"]),
       ("Is it day?", "yes", None), ("Where is the cat?", "on the sofa", None)]
# A dialogue: a text answer, then a grounding turn (its reference renders the box in [0,1000)).
CHAT_BOX = [5.0, 5.0, 30.0, 25.0]
CHAT = [{"role": "user", "content": [{"type": "image", "image": 0},
                                     {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
        {"role": "user", "content": [{"type": "text", "text": "Where is it?"}]},
        {"role": "assistant", "content": [{"type": "box", "ref": "the square", "image": 0,
                                           "boxes": [CHAT_BOX]}]}]
REFS = [("the left square", [10.0, 5.0, 30.0, 25.0]), ("the right circle", [40.0, 0.0, 50.0, 30.0]),
        ("the top bar", [0.0, 0.0, 50.0, 4.0])]
CAPTIONS = ["red circle big left corner", "blue square small right edge"]
SIZE = (50, 30)  # non-square originals


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_shards")
    im = [{"width": SIZE[0], "height": SIZE[1]}]
    with ShardWriter(out, prefix="mixed", max_samples=3) as w:
        qa = [{"question": q, "answer": a, **({"answers": h} if h else {})} for q, a, h in VQA]
        w.write("v0", {"task": "vqa", "source": "t", "images": im, "qa": qa[:2]},
                [("png", _png(*SIZE, 0))])
        w.write("v1", {"task": "vqa", "source": "t", "images": im, "qa": qa[2:]},
                [("png", _png(*SIZE, 1))])
        for i, (expr, box) in enumerate(REFS):
            task = "ref_grounding" if i == 2 else "grounding"
            w.write(f"g{i}", {"task": task, "source": "t", "images": im,
                              "refs": [{"expression": expr, "boxes": [box]}]},
                    [("png", _png(*SIZE, i))])
        for i, cap in enumerate(CAPTIONS):
            w.write(f"c{i}", {"task": "caption", "source": "t", "images": im, "caption": cap},
                    [("png", _png(*SIZE, i))])
        w.write("t0", {"task": "text", "source": "t", "text": "ignored by every eval task"}, [])
        w.write("d0", {"task": "chat", "source": "t", "images": im, "messages": CHAT},
                [("png", _png(*SIZE, 5))])
    with ShardWriter(out, prefix="dialogues") as w:  # chat records only
        w.write("d1", {"task": "chat", "source": "t", "images": im, "messages": CHAT},
                [("png", _png(*SIZE, 6))])
    return out


def _chat_message(m: dict) -> Message:
    parts = [Part(p["type"], text=p.get("text"), image=p.get("image"), ref=p.get("ref"),
                  boxes=[tuple(b) for b in p.get("boxes", [])]) for p in m["content"]]
    return Message(m["role"], parts)


def test_chat_items_prompt_chatml_up_to_each_assistant_turn(shard_dir):
    counts: dict = {}
    items = list(run_eval.iter_items([str(shard_dir / "mixed-00002.tar")], "chat", counts))
    assert [it.key for it in items] == ["d0#1", "d0#3"] and counts == {}
    box = f"<ref>the square</ref><box>{box_text(CHAT_BOX, SIZE)}</box>"
    assert [it.target for it in items] == ["A red square.", box]
    assert [it.extra["prompt"] for it in items] == ["What is this?", "Where is it?"]
    msgs = [_chat_message(m) for m in CHAT]
    for item, upto in zip(items, (1, 3), strict=True):
        want = chat_prompt(ChatSample(key="d0", source="t", task="chat", image_sizes=[SIZE],
                                      messages=msgs[:upto]))
        assert item.prompt == want  # the training template, earlier answers as recorded
        ids = pieces_to_ids(item.prompt, TOK, 4).input_ids
        assert TOK.decode(ids).endswith("<|im_start|>assistant\n")
        assert len(item.images) == 1 and item.size == SIZE


@pytest.mark.parametrize("task,keys", [
    ("vqa", {"vqa_accuracy", "exact_match"}),
    ("grounding", {"grounding_accuracy", "mean_iou", "parse_rate"}),
    ("caption", {"cider_d"}),
    ("chat", {"exact_match", "token_f1"}),
])
def test_evaluate_runs_the_model(model, shard_dir, task, keys):
    res = run_eval.evaluate(model, "mixed-*.tar", task, root=shard_dir, batch_size=2,
                            max_new_tokens=4, return_predictions=True)
    n = {"vqa": len(VQA), "grounding": len(REFS), "caption": len(CAPTIONS), "chat": 2}[task]
    assert res["task"] == task and res["num_items"] == n and res["skipped"] == {}
    assert keys <= res.keys() and len(res["predictions"]) == n
    for k in keys:
        assert 0.0 <= res[k] <= (10.0 if k == "cider_d" else 1.0)
    assert run_eval.evaluate(model, "mixed-*.tar", task, root=shard_dir, limit=2,
                             max_new_tokens=2)["num_items"] == 2


def _oracle(model, prompts, images, tokenizer, **kwargs) -> list[str]:
    """Stands in for generation: reads the prompt and answers correctly (chat: the first
    turn right, the grounding turn with the box but a wrong phrase)."""
    assert images.shape[0] == len(prompts)
    out = []
    for ids in prompts:
        text = tokenizer.decode(ids)
        if text.endswith("What is this?<|im_end|>\n<|im_start|>assistant\n"):
            out.append("A red square.")
        elif text.endswith("Where is it?<|im_end|>\n<|im_start|>assistant\n"):
            out.append(f"<ref>the cat</ref><box>{box_text(CHAT_BOX, SIZE)}</box>")
        elif m := re.search(r"<ref>(.*)</ref><box>$", text):
            box = dict(REFS)[m.group(1)]
            out.append(box_text(box, SIZE))  # generation stops at </box> (an eos id)
        elif m := re.search(r"</img>(.*) Answer:$", text):
            out.append(" " + {q: a for q, a, _ in VQA}[m.group(1)])
        else:
            assert text.endswith("</img>Describe the image in English:")
            out.append(" " + CAPTIONS[len(out) % len(CAPTIONS)])
    return out


def test_evaluate_scores_a_perfect_model_as_one(model, shard_dir, monkeypatch):
    monkeypatch.setattr(run_eval, "generate", _oracle)
    res = run_eval.evaluate(model, str(shard_dir / "mixed-*.tar"), "vqa", batch_size=3)
    assert res["vqa_accuracy"] == 1.0 and res["exact_match"] == 1.0
    res = run_eval.evaluate(model, str(shard_dir / "mixed-*.tar"), "grounding")
    assert res["grounding_accuracy"] == 1.0 and res["parse_rate"] == 1.0
    assert res["mean_iou"] > 0.9
    res = run_eval.evaluate(model, "mixed-*.tar", "caption", root=shard_dir, batch_size=2)
    assert res["cider_d"] == pytest.approx(10.0)  # no n-gram shared across images
    res = run_eval.evaluate(model, "mixed-*.tar", "chat", root=shard_dir, batch_size=1,
                            return_predictions=True)
    assert res["num_items"] == 2 and res["exact_match"] == 0.5
    # "<ref>the cat</ref><box>(x1,y1),(x2,y2)</box>" vs the same with "square": normalised
    # to "ref cat ref box x1y1 x2y2 box" (tags are words, "x,y" reads as a thousands
    # comma), 6 of 7 words agree.
    assert res["token_f1"] == pytest.approx((1.0 + 6 / 7) / 2)
    assert [r["answer"] for r in res["predictions"]][0] == "A red square."


def test_vqa_accuracy_scores_against_every_stored_answer(model, shard_dir, monkeypatch):
    """`qa[i].answers` survives the record schema: "blue" was given by 1 of 4 annotators."""
    def blue(model, prompts, images, tokenizer, **kwargs):
        return [" blue"] * len(prompts)

    monkeypatch.setattr(run_eval, "generate", blue)
    res = run_eval.evaluate(model, "mixed-*.tar", "vqa", root=shard_dir,
                            return_predictions=True)
    scores = {r["prompt"]: r["vqa_accuracy"] for r in res["predictions"]}
    assert scores["What colour is it?"] == pytest.approx(1 / 3)  # min(1 / 3, 1)
    assert scores["How many dogs?"] == 0.0
    assert res["predictions"][1]["answers"] == ["red", "Red.", "red", "blue"]


def test_cli_eval_on_an_export(model, shard_dir, tmp_path, capsys):
    from qwenvl_train.model.weights import export_consolidated

    export_consolidated(model, model.config, tmp_path / "export")
    rc = eval_cli.main(["--export", str(tmp_path / "export"), "--shards", "mixed-*.tar",
                        "--root", str(shard_dir), "--task", "grounding", "--limit", "2",
                        "--image-size", str(IMAGE_SIZE), "--max-new-tokens", "3",
                        "--predictions", str(tmp_path / "p.jsonl")])
    assert rc == 0
    out = capsys.readouterr().out  # libraries may log to stdout before the JSON
    res = json.loads(out[out.index("{\n"):])
    assert res["num_items"] == 2 and 0.0 <= res["grounding_accuracy"] <= 1.0
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 2


def test_cli_eval_on_a_run_directory_and_chat_shards(model, shard_dir, tmp_path, capsys):
    from qwenvl_train.model.weights import export_consolidated

    run = tmp_path / "run"  # what a run leaves: its config and export/
    export_consolidated(model, model.config, run / "export")
    (run / "config.json").write_text(json.dumps({
        "stage": {"template": "sft", "image_size": IMAGE_SIZE},
        "data": {"root": str(shard_dir)}, "eval": {"root": None,
                                                   "tasks": {"chat": "dialogues-*.tar"}}}))
    # The run's eval.tasks name the shards; its stage picks ChatML prompts.
    assert eval_cli.main([str(run), "--max-new-tokens", "3", "--table",
                          "--predictions", str(tmp_path / "p.jsonl")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["task", "metric", "value"]
    assert [line.split()[:2] for line in table[1:]] == [
        ["chat", "items"], ["chat", "exact_match"], ["chat", "token_f1"]]
    assert table[1].split()[2] == "2"  # two assistant turns
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in rows][0] == "A red square."
    # Chat shards asked for a task they hold no records of: 0 items, and why.
    assert eval_cli.main(["--export", str(run / "export"), "--root", str(shard_dir),
                          "--shards", "dialogues-*.tar", "--task", "vqa",
                          "--image-size", str(IMAGE_SIZE)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out[captured.out.index("{\n"):])["num_items"] == 0
    assert ("vqa: 0 items: the shards hold no vqa records (they hold: chat 1); evaluate them "
            "with task chat") in captured.err
    # Without --task: every task the shards hold records for (here chat).
    assert eval_cli.main([str(run / "export"), "--root", str(shard_dir), "--shards",
                          "dialogues-*.tar", "--max-new-tokens", "2", "--image-size",
                          str(IMAGE_SIZE)]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{\n"):])["task"] == "chat"


def test_cli_eval_user_errors(tmp_path, capsys):
    assert eval_cli.main([str(tmp_path), "--shards", "x-*.tar"]) == 2
    assert "matches no .tar" in capsys.readouterr().err
    assert eval_cli.main([str(tmp_path)]) == 2
    assert "--shards is required" in capsys.readouterr().err


def test_samples_table_draws_predicted_and_true_boxes_at_their_pixels():
    """A grounding row as evaluation scores it -> the W&B table's picture: the predicted box
    (parsed from the answer's [0, 1000) text, mapped back to pixels) and the true box are
    outlined on the item's image in the first two palette colours, nothing else."""
    from qwenvl_train.data.draw import PALETTE
    from qwenvl_train.eval.items import Item
    from qwenvl_train.eval.samples import table_rows

    size, grey = (300, 280), (90, 90, 90)
    buf = io.BytesIO()
    Image.new("RGB", size, grey).save(buf, format="PNG")
    true_box, pred_box = [20.0, 30.0, 120.0, 140.0], [150.0, 100.0, 270.0, 250.0]
    item = Item(key="g0", prompt=[], images=[buf.getvalue()], sizes=[size], target=[true_box],
                extra={"prompt": "the square"})
    answer = f"<ref>the square</ref><box>{box_text(pred_box, size)}</box>"
    row = {"index": 0, "key": "g0", "prompt": "Where is the square?",
           **run_eval._score("grounding", item, answer, "chat")}
    assert row["box"] == pytest.approx(pred_box, abs=0.3) and not row["correct"]
    (out,) = table_rows("grounding", [item], [row])
    assert (out["task"], out["answer"], out["reference"]) == (
        "grounding", answer, "(20, 30, 120, 140)")
    pic = out["image"]
    for box, colour in ((row["box"], PALETTE[0]), (true_box, PALETTE[1])):
        x1, y1, x2, y2 = (round(c) for c in box)
        ymid = (y1 + y2) // 2
        assert pic.getpixel((x1, ymid)) == colour and pic.getpixel((x2 - 1, ymid)) == colour
        assert pic.getpixel((x1 - 1, ymid)) == grey and pic.getpixel((x1 + 10, ymid)) == grey
    assert pic.getpixel((5, 5)) == grey  # the rest of the image untouched
