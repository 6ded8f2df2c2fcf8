"""VQA converters: VQAv2 (questions + annotations) and GQA balanced questions."""

from __future__ import annotations

import io
import json

from PIL import Image

from data_recipes import run_conversion
from data_recipes.vqa import GQA, VQAv2, most_common_answer
from data_recipes.wds import read_samples


def _jpeg(size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, "JPEG")
    return buf.getvalue()


def _answers(*texts: str) -> list[dict]:
    return [{"answer": t, "answer_confidence": "yes", "answer_id": i + 1}
            for i, t in enumerate(texts)]


def _vqav2_files(tmp_path):
    images = tmp_path / "train2014"
    images.mkdir()
    (images / "COCO_train2014_000000458752.jpg").write_bytes(_jpeg())
    (images / "COCO_train2014_000000262146.jpg").write_bytes(_jpeg((30, 20)))
    questions = {
        "info": {"description": "VQA v2"}, "task_type": "Open-Ended", "data_type": "mscoco",
        "license": {"name": "CC"}, "data_subtype": "train2014",
        "questions": [
            {"image_id": 458752, "question": "What is this photo taken looking through?",
             "question_id": 458752000},
            {"image_id": 458752, "question": "What position is this man playing?",
             "question_id": 458752001},
            {"image_id": 262146, "question": "What is he on top of?", "question_id": 262146000},
            {"image_id": 999, "question": "Missing image?", "question_id": 999000},
        ],
    }
    annotations = {
        "info": {}, "license": {}, "data_subtype": "train2014",
        "annotations": [
            {"question_type": "what is this", "multiple_choice_answer": "net",
             "answers": _answers(*["net"] * 9, "netting"), "image_id": 458752,
             "answer_type": "other", "question_id": 458752000},
            {"question_type": "what", "multiple_choice_answer": "pitcher",
             "answers": _answers("catcher", "pitcher", "pitcher", "catcher", "pitcher",
                                 "pitcher", "pitcher", "catcher", "catcher", "catcher"),
             "image_id": 458752, "answer_type": "other", "question_id": 458752001},
            {"question_type": "what is he", "multiple_choice_answer": "skis",
             "answers": _answers(*["hill"] * 6, *["skis"] * 4), "image_id": 262146,
             "answer_type": "other", "question_id": 262146000},
            {"question_type": "x", "multiple_choice_answer": "yes",
             "answers": _answers("yes"), "image_id": 999, "question_id": 999000},
        ],
    }
    q = tmp_path / "v2_OpenEnded_mscoco_train2014_questions.json"
    a = tmp_path / "v2_mscoco_train2014_annotations.json"
    q.write_text(json.dumps(questions))
    a.write_text(json.dumps(annotations))
    return q, a, images


def test_most_common_answer_ties_go_to_first():
    assert most_common_answer(_answers("b", "a", "a", "b")) == "b"
    assert most_common_answer(_answers("  two  dogs ", "two dogs", "x")) == "two dogs"
    assert most_common_answer([]) is None


def test_vqav2(tmp_path):
    q, a, images = _vqav2_files(tmp_path)
    m = run_conversion(VQAv2(str(q), str(a), str(images)), tmp_path / "out")
    assert m["num_samples"] == 3 and m["skipped"] == {"missing_image": 1}
    got = read_samples(str(tmp_path / "out"))
    assert got["q458752000"] == ({"task": "vqa", "source": "vqav2",
                                  "images": [{"width": 64, "height": 48}],
                                  "qa": [{"question": "What is this photo taken looking through?",
                                          "answer": "net",
                                          "answers": ["net"] * 9 + ["netting"]}]}, [_jpeg()])
    # 5 x pitcher vs 5 x catcher: the tie goes to the first answer given ("catcher").
    assert got["q458752001"][0]["qa"][0]["answer"] == "catcher"
    assert got["q262146000"][0]["qa"][0]["answer"] == "hill"
    assert got["q262146000"][0]["images"] == [{"width": 30, "height": 20}]

    m = run_conversion(VQAv2(str(q), str(a), str(images), answer="multiple_choice",
                             qa_per_sample=3), tmp_path / "grouped")
    got = read_samples(str(tmp_path / "grouped"))
    assert m["num_samples"] == 2
    pitcher = ["catcher", "pitcher", "pitcher", "catcher", "pitcher", "pitcher", "pitcher",
               "catcher", "catcher", "catcher"]
    assert got["q458752000"][0]["qa"] == [
        {"question": "What is this photo taken looking through?", "answer": "net",
         "answers": ["net"] * 9 + ["netting"]},
        {"question": "What position is this man playing?", "answer": "pitcher",
         "answers": pitcher}]
    assert got["q262146000"][0]["qa"] == [{"question": "What is he on top of?", "answer": "skis",
                                           "answers": ["hill"] * 6 + ["skis"] * 4}]


def test_gqa(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "2375429.jpg").write_bytes(_jpeg((64, 48)))
    data = {
        "02930152": {"semantic": [], "entailed": [], "equivalent": ["02930152"],
                     "question": "Is the sky dark?", "imageId": "2375429", "isBalanced": True,
                     "groups": {"global": None, "local": "06-sky_dark"},
                     "answer": "yes", "semanticStr": "select: sky ->verify color: dark",
                     "annotations": {"answer": {}, "question": {"2": "2375444"},
                                     "fullAnswer": {}},
                     "types": {"detailed": "verifyAttr", "semantic": "attr",
                               "structural": "verify"},
                     "fullAnswer": "Yes, the sky is dark."},
        "07333408": {"question": "What is on the white wall?", "imageId": "2375429",
                     "answer": "pipe", "fullAnswer": "The pipe is on the wall."},
        "07333409": {"question": "What colour is the car?", "imageId": "n404",
                     "answer": "red", "fullAnswer": "The car is red."},
    }
    src = tmp_path / "train_balanced_questions.json"
    src.write_text(json.dumps(data))
    m = run_conversion(GQA(str(src)), tmp_path / "out")
    assert m["num_samples"] == 2 and m["skipped"] == {"missing_image": 1}
    got = read_samples(str(tmp_path / "out"))
    assert got["q02930152"][0] == {"task": "vqa", "source": "gqa",
                                   "images": [{"width": 64, "height": 48}],
                                   "qa": [{"question": "Is the sky dark?", "answer": "yes"}]}
    assert got["q07333408"][0]["qa"][0]["answer"] == "pipe"
    run_conversion(GQA(str(src), answer="full", qa_per_sample=2), tmp_path / "full")
    got = read_samples(str(tmp_path / "full"))
    assert [qa["answer"] for qa in got["q02930152"][0]["qa"]] == [
        "Yes, the sky is dark.", "The pipe is on the wall."]


def test_vqa_table_parquet_with_image_bytes_and_jsonl_with_paths(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_recipes.vqa import VQATable

    png = io.BytesIO()
    Image.new("RGB", (40, 20), (9, 9, 9)).save(png, "PNG")
    rows = [  # the layout of the Hugging Face DocVQA / TextVQA exports
        {"questionId": 337, "question": "what is the date mentioned?",
         "answers": ["1/8/93", "1/8/93", "01/08/93"], "image": {"bytes": png.getvalue(),
                                                                 "path": None}},
        {"questionId": 338, "question": "", "answers": ["x"],
         "image": {"bytes": png.getvalue(), "path": None}},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "docvqa.parquet")
    m = run_conversion(VQATable(str(tmp_path / "docvqa.parquet"), source="docvqa"),
                       tmp_path / "out")
    assert m["num_samples"] == 1 and m["skipped"] == {"no_answer": 1}
    [(rec, ims)] = read_samples(str(tmp_path / "out")).values()
    assert rec == {"task": "vqa", "source": "docvqa", "images": [{"width": 40, "height": 20}],
                   "qa": [{"question": "what is the date mentioned?", "answer": "1/8/93",
                           "answers": ["1/8/93", "1/8/93", "01/08/93"]}]}
    assert ims == [png.getvalue()]

    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(_jpeg())
    lines = [{"image": "a.jpg", "query": "Which year is highest?", "label": ["2019"]}]
    (tmp_path / "chartqa.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    run_conversion(VQATable(str(tmp_path / "chartqa.jsonl"), image_root=str(tmp_path / "imgs"),
                            question_field="query", answer_field="label"), tmp_path / "c")
    [(rec, ims)] = read_samples(str(tmp_path / "c")).values()
    assert rec["qa"] == [{"question": "Which year is highest?", "answer": "2019"}]
    assert ims == [_jpeg()]


def test_vqa_table_image_paths_are_relative_to_the_table(tmp_path, monkeypatch):
    from data_recipes.vqa import VQATable

    data = tmp_path / "chartqa"
    (data / "png").mkdir(parents=True)
    (data / "png" / "a.jpg").write_bytes(_jpeg())
    (data / "train.jsonl").write_text(json.dumps(
        {"image": "png/a.jpg", "question": "Highest?", "answers": ["2019"]}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory plays no part
    m = run_conversion(VQATable(str(data / "train.jsonl")), tmp_path / "out")
    assert m["num_samples"] == 1 and m["skipped"] == {}
    [(rec, ims)] = read_samples(str(tmp_path / "out")).values()
    assert rec["qa"] == [{"question": "Highest?", "answer": "2019"}] and ims == [_jpeg()]
