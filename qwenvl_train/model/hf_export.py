"""`export/llm/`: the LLM as a complete transformers directory, with a working tokenizer.

`AutoModelForCausalLM.from_pretrained(export/llm)` and `AutoTokenizer.from_pretrained(
export/llm)` work without remote code. The tokenizer is a `tokenizer.json` in Qwen2's format
(class `Qwen2Tokenizer`), built from our BPE ranks (`qwen.tiktoken`) and the Qwen-VL special
tokens at their ids, so it produces our ids (data/tokenizer.py):

  - byte-level BPE over the ranks; the merges are every split (a, b) of each token into two
    tokens, ordered by the rank of the token, so BPE merges like tiktoken does (lowest-rank
    result first); `ignore_merges` returns a pre-token that is itself a token whole, as
    tiktoken does (transformers 5 rebuilds Qwen2Tokenizer without it; measured equal ids
    either way, scripts/check_hf_tokenizer.py);
  - the Qwen pre-tokenisation regex, and NFC normalisation, as the released QWenTokenizer
    and Qwen2's tokenizer do. Our data tokenizer does not normalise: ids are equal for NFC
    text (nearly all text), and differ only where the input is not NFC.

Chat models (stage `sft`) stop on `<|im_end|>` and `<|endoftext|>` and carry a ChatML
chat template with the training system prompt; base models stop on `<|endoftext|>`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from qwenvl_train.data.templates import SYSTEM_PROMPT
from qwenvl_train.data.tokenizer import PAT_STR, default_vocab_file, load_ranks
from qwenvl_train.model import groups as G
from qwenvl_train.tokens import (
    ENDOFTEXT,
    EOD_ID,
    IM_END,
    IM_END_ID,
    IM_START,
    SPECIAL_TOKEN_IDS,
)

TOKENIZER_CLASS = "Qwen2Tokenizer"
BUILD_VERSION = 1  # bump when the tokenizer.json built here changes


def _byte_chars() -> dict[int, str]:
    """Byte-level BPE's printable alias of each byte: printable Latin-1 bytes stand for
    themselves, the other 68 take the code points from 256 on, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    out: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def bpe_vocab_and_merges(ranks: Mapping[bytes, int]
                         ) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """tiktoken ranks -> byte-level BPE vocab and merges (see the module docstring)."""
    chars = _byte_chars()

    def alias(token: bytes) -> str:
        return "".join(chars[b] for b in token)

    vocab = {alias(token): rank for token, rank in ranks.items()}
    merges: list[tuple[str, str]] = []
    for token, _ in sorted(ranks.items(), key=lambda kv: kv[1]):
        splits = sorted((ranks[token[:i]], ranks[token[i:]], i) for i in range(1, len(token))
                        if token[:i] in ranks and token[i:] in ranks)
        merges += [(alias(token[:i]), alias(token[i:])) for _, _, i in splits]
    return vocab, merges


def _build_tokenizer_json(vocab_file: Path) -> str:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    vocab, merges = bpe_vocab_and_merges(load_ranks(vocab_file))
    vocab.update(SPECIAL_TOKEN_IDS)
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False,
                        byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in SPECIAL_TOKEN_IDS])
    return tok.to_str()


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwenvl_train"


@functools.lru_cache(maxsize=1)
def hf_tokenizer_json(vocab_file: str | None = None) -> str:
    """The serialized `tokenizers.Tokenizer` equal to ours. Building it takes ~5 s, so it is
    kept in ~/.cache/qwenvl_train, keyed by the ranks file's hash and this builder's version."""
    path = Path(vocab_file or default_vocab_file())
    key = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    cached = _cache_dir() / f"tokenizer-v{BUILD_VERSION}-{key}.json"
    if cached.is_file():
        return cached.read_text()
    text = _build_tokenizer_json(path)
    try:  # best effort; written whole, then renamed (concurrent writers are fine)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, cached)
    except OSError:
        pass
    return text


def chatml_template() -> str:
    """Jinja ChatML as stage `sft` trains it: the default system prompt unless the dialogue
    brings one, `<|im_start|>{role}\\n{content}<|im_end|>\\n` per turn."""
    start, end = IM_START, IM_END
    return (
        "{% if messages[0]['role'] != 'system' %}"
        f"{{{{ '{start}system\\n{SYSTEM_PROMPT}{end}\\n' }}}}"
        "{% endif %}"
        "{% for message in messages %}"
        f"{{{{ '{start}' + message['role'] + '\\n' + message['content'] + '{end}\\n' }}}}"
        "{% endfor %}"
        f"{{% if add_generation_prompt %}}{{{{ '{start}assistant\\n' }}}}{{% endif %}}"
    )


def generation_stop_ids(chat: bool) -> list[int]:
    """Token ids that end a generation: `<|im_end|>` first for chat models."""
    return [IM_END_ID, EOD_ID] if chat else [EOD_ID]


def write_hf_tokenizer(out_dir: str | Path, chat: bool, max_length: int) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(hf_tokenizer_json())
    config = {
        "tokenizer_class": TOKENIZER_CLASS,
        "model_max_length": max_length,
        "eos_token": IM_END if chat else ENDOFTEXT,
        "pad_token": ENDOFTEXT,
        "bos_token": None,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    if chat:
        config["chat_template"] = chatml_template()
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False)
                                               + "\n")


def _patch_json(path: Path, **values) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(values)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _save_quietly(llm: nn.Module, out: Path, state_dict: dict[str, torch.Tensor]) -> None:
    """`save_pretrained` without transformers' shard progress bar (our export log says what
    was written and where)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        llm.save_pretrained(str(out), state_dict=state_dict)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def save_hf_llm(llm: nn.Module, tensors: Mapping[str, torch.Tensor], out_dir: str | Path,
                chat: bool) -> Path:
    """`llm` (a transformers causal LM, possibly on the meta device) saved with the `llm.*`
    tensors of the full-model state dict `tensors`, then made complete: `use_cache` on,
    stop and pad ids, generation_config.json, tokenizer files."""
    out = Path(out_dir)
    llm_sd = {G.local(k): v for k, v in tensors.items() if k.startswith(G.LLM + ".")}
    _save_quietly(llm, out, llm_sd)
    eos = generation_stop_ids(chat)
    _patch_json(out / "config.json", use_cache=True, eos_token_id=eos[0], pad_token_id=EOD_ID,
                bos_token_id=None)
    _patch_json(out / "generation_config.json", eos_token_id=eos if chat else eos[0],
                pad_token_id=EOD_ID, bos_token_id=None)
    write_hf_tokenizer(out, chat, max_length=int(llm.config.max_position_embeddings))
    return out
