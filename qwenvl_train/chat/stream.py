"""Streaming output: hand text to a callback as tokens are generated, whole characters only.

A BPE token may end in the middle of a UTF-8 character (many Chinese characters take two
tokens), so token bytes go through an incremental UTF-8 decoder that keeps an incomplete
character until its last byte arrives. The end-of-sequence token is not text; a stop
string ends the text before it, and the last `len(stop) - 1` characters are held back
until they cannot start one. The pieces handed out join to exactly the text the
non-streaming path returns (`eval.generate.generate`).
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence

import torch
from transformers.generation.streamers import BaseStreamer

from qwenvl_train.data.tokenizer import QwenVLTokenizer
from qwenvl_train.eval.generate import cut_at_strings


class TextStream(BaseStreamer):
    """A transformers streamer for one row: `on_text(piece)` per newly complete text."""

    def __init__(self, tokenizer: QwenVLTokenizer, eos_ids: Sequence[int],
                 on_text: Callable[[str], None], stop_strings: Sequence[str] = ()):
        self.tokenizer, self.eos, self.on_text = tokenizer, set(eos_ids), on_text
        self.stops = [s for s in stop_strings if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # decoded so far
        self.sent = 0  # characters handed to on_text
        self.prompt_seen = False
        self.finished = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt ids
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            if self.finished:
                return
            if token in self.eos:
                self.end()
                return
            self.text += self.decoder.decode(self.tokenizer.decode_bytes([token]))
            self._emit(final=False)

    def end(self) -> None:
        if not self.finished:
            self.text += self.decoder.decode(b"", final=True)
            self._emit(final=True)
            self.finished = True

    def _emit(self, final: bool) -> None:
        visible = cut_at_strings(self.text, self.stops)
        stopped = len(visible) < len(self.text)
        upto = len(visible) if final or stopped else len(visible) - self.hold
        if upto > self.sent:
            self.on_text(visible[self.sent:upto])
            self.sent = upto
        if stopped:
            self.finished = True
