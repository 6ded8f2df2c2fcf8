"""Known answers for evaluation during training: `OracleAnswers` replaces generation with
the right answer for the eval items at even positions of each task and "zzz" for the
others, so every generation metric of a real run has a value a test can state."""

from __future__ import annotations

import hashlib
import itertools

import torch

from qwenvl_train.data.encode import pieces_to_ids
from qwenvl_train.data.templates import box_text
from qwenvl_train.data.tokenizer import get_tokenizer
from qwenvl_train.eval import run_eval
from qwenvl_train.eval.items import Item
from qwenvl_train.training.callbacks import TrainerCallback

WRONG = "zzz"


def right_answer(task: str, item: Item, mode: str) -> str:
    if task == "chat":
        return item.target
    if task == "grounding":
        box = box_text(item.target[0], item.size)
        return box if mode == "base" else f"<ref>{item.extra['prompt']}</ref><box>{box}</box>"
    text = item.target[0] if task == "caption" else item.extra["reference"]
    return " " + text if mode == "base" else text


def _key(ids: list[int], pixels: torch.Tensor) -> tuple:
    return tuple(ids), tuple(hashlib.sha1(p.numpy().tobytes()).hexdigest() for p in pixels)


class OracleAnswers(TrainerCallback):
    def on_train_start(self, trainer) -> None:
        cfg, tok = trainer.cfg, get_tokenizer()
        mode = cfg.eval.prompt_mode(cfg.stage.template)
        answers: dict[tuple, str] = {}
        for task, pattern in cfg.eval.tasks.items():
            paths = run_eval.resolve_shards(pattern, cfg.eval.shard_root(cfg.data.root))
            items = run_eval.iter_items(paths, task, {}, mode=mode)
            for i, item in enumerate(itertools.islice(items, cfg.eval.max_items)):
                run_eval.decode(item, cfg.stage.image_size)
                ids = pieces_to_ids(item.prompt, tok, cfg.model.adapter.num_queries).input_ids
                item_mode = "chat" if task == "chat" else mode
                answers[_key(ids, item.pixels)] = (right_answer(task, item, item_mode)
                                                   if i % 2 == 0 else WRONG)

        def oracle(model, prompts, images, tokenizer, **kwargs) -> list[str]:
            out, start = [], 0
            for ids in prompts:
                n = list(ids).count(tokenizer.img_start_id)
                out.append(answers[_key(list(ids), images[start:start + n].cpu())])
                start += n
            return out

        run_eval.generate = oracle
