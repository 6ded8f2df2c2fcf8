"""A conversation with a loaded QwenVL: prompt, generate (KV cache, greedy or sampled,
streamed), and turn the boxes of an answer into pixels and a drawn image.

Boxes and quads in an answer are in [0, 1000) units of the latest image of the dialogue;
they are mapped back to that image's ORIGINAL pixels with `eval.parse` (the bin centre,
the inverse of the training encoder) and drawn on it, labelled with their `<ref>`, by the
data inspector's `draw_shapes`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessor

from qwenvl_train.chat.prompt import (
    MODES,
    ChatError,
    Conversation,
    Turn,
    base_closing,
    base_context,
    last_text,
    pieces_for,
)
from qwenvl_train.chat.stream import TextStream
from qwenvl_train.data import tokenizer as tk
from qwenvl_train.data.draw import draw_shapes
from qwenvl_train.data.encode import pieces_to_ids
from qwenvl_train.data.images import load_image, open_image, to_rgb
from qwenvl_train.eval.generate import OnlyTokenizerIds, generate, stop_ids
from qwenvl_train.eval.parse import box_to_pixels, parse_grounding, quad_to_pixels


@dataclass
class GenerationOptions:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0: greedy; > 0: sampling
    top_p: float = 1.0  # nucleus sampling (with temperature > 0)
    top_k: int = 0  # 0: off (with temperature > 0)
    seed: int | None = None  # re-seeds torch before every answer

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ChatError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ChatError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ChatError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ChatError(f"--top-k must be >= 0 (0 = off), got {self.top_k}")
        if self.temperature == 0 and (self.top_p < 1 or self.top_k > 0):
            raise ChatError("--top-p/--top-k shape sampling: add --temperature > 0 "
                            "(e.g. --temperature 0.7), or drop them for greedy decoding")


@dataclass
class Answer:
    text: str  # as generated (grounding tags kept), cut at the end of the turn
    grounding: list[dict[str, Any]] = field(default_factory=list)
    image: str | None = None  # the image the boxes refer to (path)
    box_image: str | None = None  # where the drawn boxes were written

    def to_dict(self) -> dict[str, Any]:
        return {"answer": self.text, "grounding": self.grounding, "image": self.image,
                "box_image": self.box_image}


class ChatSession:
    """Holds one conversation with `model`; `ask` answers the next user message."""

    def __init__(self, model, *, mode: str = "chat", options: GenerationOptions | None = None,
                 system: str | None = None, box_dir: str | Path = "qwenvl-chat-boxes",
                 tokenizer: tk.QwenVLTokenizer | None = None,
                 logits_processor: Sequence[LogitsProcessor] = ()):
        if mode not in MODES:
            raise ChatError(f"--mode must be one of {MODES}, got {mode!r}")
        self.model, self.mode = model, mode
        self.options = options or GenerationOptions()
        self.options.validate()
        self.system = system
        self.box_dir = Path(box_dir)
        self.tok = tokenizer or tk.get_tokenizer()
        self.logits_processor = list(logits_processor)
        self.conv = Conversation(mode, system)
        self.last_prompt: list[int] = []  # ids of the latest prompt (for tests and tools)

    def reset(self) -> None:
        self.conv = Conversation(self.mode, self.system)

    def add_history(self, text: str, answer: str, image_paths: Sequence[str] = (),
                    base_dir: str | Path = ".") -> None:
        """A past exchange whose answer is given (batch conversations)."""
        self.conv.add_user(text, image_paths, base_dir).answer = answer

    def ask(self, text: str, image_paths: Sequence[str] = (), *, base_dir: str | Path = ".",
            on_text: Callable[[str], None] | None = None, name: str | None = None) -> Answer:
        """Answer a user message; `on_text` receives the answer as it is generated, `name`
        names the box image (`{box_dir}/{name}.png`; default: the turn number)."""
        n_images = len(self.conv.images)
        turn = self.conv.add_user(text, image_paths, base_dir)
        try:
            answer = self._generate(turn, on_text)
        except BaseException:  # interrupted (Ctrl-C) or failed: the message never happened
            self.conv.turns.pop()
            del self.conv.images[n_images:]
            raise
        turn.answer = answer
        return self._ground(turn, answer, name or f"turn{len(self.conv.turns):03d}")

    # ---- generation ---------------------------------------------------------------------
    def _stops(self, turn: Turn) -> tuple[list[int], list[str]]:
        """End-of-answer ids and strings. Base mode as the official evaluation: stop at
        `</box>` after a prompt ending in `<box>`, at a newline after `Answer:`."""
        if self.mode == "chat":
            return stop_ids(self.tok), []
        extra = [self.tok.box_end_id] if base_closing(turn) else []
        return stop_ids(self.tok, extra), (["\n"] if last_text(turn).endswith("Answer:") else [])

    def _generate(self, turn: Turn, on_text: Callable[[str], None] | None) -> str:
        tokens = pieces_to_ids(pieces_for(self.conv), self.tok, self.model.num_queries)
        self.last_prompt = tokens.input_ids
        o = self.options
        limit = self.model.config.llm.max_position_embeddings
        if len(tokens.input_ids) + o.max_new_tokens > limit:
            raise ChatError(f"the conversation is {len(tokens.input_ids)} tokens; with "
                            f"--max-new-tokens {o.max_new_tokens} it passes the model's "
                            f"{limit} positions: /clear to start over, or fewer new tokens")
        images = None
        if tokens.image_order:
            images = torch.stack([load_image(self.conv.images[i].data, self.model.image_size)
                                  for i in tokens.image_order])
        eos, stops = self._stops(turn)
        if o.seed is not None:
            torch.manual_seed(o.seed)
        stream = TextStream(self.tok, eos, on_text, stops) if on_text else None
        (text,) = generate(self.model, [tokens.input_ids], images, self.tok,
                           max_new_tokens=o.max_new_tokens, eos_ids=eos, stop_strings=stops,
                           do_sample=o.temperature > 0, temperature=o.temperature,
                           top_p=o.top_p, top_k=o.top_k or None, streamer=stream,
                           logits_processor=[OnlyTokenizerIds(self.tok.vocab_size),
                                             *self.logits_processor])
        if stream is not None:
            stream.end()
        return text

    # ---- boxes ------------------------------------------------------------------------
    def _ground(self, turn: Turn, text: str, name: str) -> Answer:
        context = base_context(turn) if self.mode == "base" else ""
        items = parse_grounding(context + text)
        answer = Answer(text)
        if not items:
            return answer
        idx = self.conv.latest_image()
        image = self.conv.images[idx] if idx is not None else None
        shapes = []
        for g in items:
            item: dict[str, Any] = {"ref": g.ref}
            if g.quad is not None:
                item["quad_1000"] = [list(p) for p in g.quad]
                if image is not None:
                    item["quad"] = [list(p) for p in quad_to_pixels(g.quad, image.size)]
                    shapes.append((0, "quad", g.ref or "text", item["quad"]))
            else:
                item["boxes_1000"] = [list(b) for b in g.boxes]
                if image is not None:
                    item["boxes"] = [list(box_to_pixels(b, image.size)) for b in g.boxes]
                    shapes += [(0, "box", g.ref or "box", b) for b in item["boxes"]]
            answer.grounding.append(item)
        if image is None:  # a text-only dialogue: nothing to draw on
            return answer
        answer.image = image.path
        self.box_dir.mkdir(parents=True, exist_ok=True)
        out = self.box_dir / f"{name}.png"
        lines = [f"{Path(image.path).name}  {image.size[0]}x{image.size[1]}",
                 f"assistant: {text}"]
        draw_shapes([to_rgb(open_image(image.data))], shapes, lines, out)
        answer.box_image = str(out)
        return answer
