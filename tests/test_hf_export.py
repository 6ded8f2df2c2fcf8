"""export/llm/: a complete transformers directory. Its tokenizer (no remote code) gives our
ids for text and every special token; chat exports stop on <|im_end|>; the cache is on."""

from __future__ import annotations

import json

import pytest
import torch
from model_helpers import tiny_config
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from qwenvl_train.data.tokenizer import get_tokenizer
from qwenvl_train.model.hf_export import hf_tokenizer_json
from qwenvl_train.model.qwenvl import build_model
from qwenvl_train.model.weights import export_consolidated
from qwenvl_train.tokens import ENDOFTEXT, EOD_ID, IM_END_ID, SPECIAL_TOKEN_IDS

MIXED = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
         "Picture 1: <img>demo.jpg</img>\n图中的猫在哪里？Where's the cat, and what's 12.5% of "
         "3,000?\n\t  <ref>猫</ref><box>(12,34),(567,890)</box><quad>(1,2),(3,4),(5,6),(7,8)"
         "</quad><|extra_0|><|extra_204|><imgpad>😀 é ﬁ\u00a0 \r\n<|im_end|>\n<|im_start|>"
         "assistant\n它在沙发上。<|im_end|><|endoftext|>")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    cfg = tiny_config()
    torch.manual_seed(0)
    model = build_model(cfg, 224).eval()
    root = tmp_path_factory.mktemp("exports")
    with pytest.MonkeyPatch.context() as mp:  # build tokenizer.json here, not from a cache
        mp.setenv("XDG_CACHE_HOME", str(root / "cache"))
        hf_tokenizer_json.cache_clear()
        chat = export_consolidated(model, cfg, root / "chat", chat=True) / "llm"
        base = export_consolidated(model, cfg, root / "base", chat=False) / "llm"
        assert list((root / "cache" / "qwenvl_train").glob("tokenizer-v*.json"))
    return model, chat, base


@pytest.fixture(scope="module")
def hf(exports):
    return AutoTokenizer.from_pretrained(exports[1])  # tokenizer.json; no trust_remote_code


def test_tokenizer_ids_equal_ours(hf):
    ours = get_tokenizer()
    ids = hf(MIXED, add_special_tokens=False)["input_ids"]
    assert ids == ours.encode(MIXED, allow_special=True)
    assert hf.decode(ids) == MIXED
    # NFC like the released QWenTokenizer (ours does not normalise): e + combining acute
    decomposed = MIXED.replace("é", "e\u0301")
    assert hf(decomposed, add_special_tokens=False)["input_ids"] == ids
    assert len(hf) == ours.vocab_size == 151860
    for token, token_id in SPECIAL_TOKEN_IDS.items():
        assert hf.convert_tokens_to_ids(token) == token_id
        assert hf(token, add_special_tokens=False)["input_ids"] == [token_id]
    assert (hf.eos_token_id, hf.pad_token_id) == (IM_END_ID, EOD_ID)


def test_chat_template_renders_the_training_chatml(hf):
    text = hf.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False,
                                  add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n")


@torch.no_grad()
def test_llm_dir_is_complete(exports):
    model, chat, base = exports
    for path, stops in ((chat, [IM_END_ID, EOD_ID]), (base, EOD_ID)):
        config = json.loads((path / "config.json").read_text())
        assert config["use_cache"] is True and config["pad_token_id"] == EOD_ID
        gen = GenerationConfig.from_pretrained(path)
        assert gen.eos_token_id == stops and gen.pad_token_id == EOD_ID
    assert json.loads((base / "tokenizer_config.json").read_text())["eos_token"] == ENDOFTEXT
    llm = AutoModelForCausalLM.from_pretrained(chat).eval()
    ids = torch.tensor([get_tokenizer().encode(MIXED, allow_special=True)])
    assert torch.equal(llm(input_ids=ids).logits, model.llm(input_ids=ids).logits)
    out = llm.generate(ids[:, :12], max_new_tokens=3, do_sample=False)  # uses the KV cache
    assert out.shape == (1, 15)
