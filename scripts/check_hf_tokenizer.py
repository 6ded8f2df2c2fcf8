"""The exported transformers tokenizer (export/llm/tokenizer.json) against ours, on a corpus.

Tokenizes the same NFC texts with our tiktoken tokenizer and with the exported tokenizer,
loaded twice: raw (`tokenizers.Tokenizer.from_file`, as written) and through
`transformers.AutoTokenizer` (which, in transformers 5, rebuilds Qwen2Tokenizer from the
vocab and merges). Corpus: the first N Python source files of the standard library
(English, code, whitespace runs), 20,000 random CJK characters, and random mixes of ASCII,
CJK, CJK punctuation, Latin-1/extended, emoji, NBSP and line separators.

    OMP_NUM_THREADS=1 python scripts/check_hf_tokenizer.py [--files 300] [--mixes 2000]
"""

from __future__ import annotations

import argparse
import random
import sysconfig
import tempfile
import time
import unicodedata
from pathlib import Path


def corpus(files: int, mixes: int) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(errors="replace")[:20000] for p in sorted(stdlib.rglob("*.py"))[:files]]
    rng = random.Random(0)
    texts.append("".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(20000)))
    codes = [*range(32, 127), *range(0x4E00, 0x4E80), *range(0x3000, 0x3040),
             *range(0xC0, 0x180), 0x1F600, 0x200B, 0xA0, 0x2028]
    pool = [chr(c) for c in codes] + ["\n", "\r\n", "\t", "  "]
    for _ in range(mixes):
        texts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 200))))
    return [unicodedata.normalize("NFC", t) for t in texts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=300)
    ap.add_argument("--mixes", type=int, default=2000)
    args = ap.parse_args()

    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from qwenvl_train.config import load_config
    from qwenvl_train.data.tokenizer import get_tokenizer
    from qwenvl_train.model.export import export_model
    from qwenvl_train.model.qwenvl import build_model

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(["model=tiny"]).model
        t0 = time.perf_counter()
        model = build_model(cfg, 224)
        llm = export_model(model.state_dict(), cfg, tmp, ["hf_llm"], chat=True,
                           image_size=224)["hf_llm"]
        print(f"export/llm written in {time.perf_counter() - t0:.1f} s")
        raw = Tokenizer.from_file(str(llm / "tokenizer.json"))
        loaders = {"tokenizers (raw tokenizer.json)": raw,
                   "transformers.AutoTokenizer": AutoTokenizer.from_pretrained(llm)}
        ours = get_tokenizer()
        texts = corpus(args.files, args.mixes)
        reference = [ours.encode(t) for t in texts]
        print(f"{len(texts)} texts, {sum(map(len, reference)):,} tokens (ours)")
        for name, tok in loaders.items():
            encode = ((lambda t, tok=tok: tok.encode(t, add_special_tokens=False).ids)
                      if isinstance(tok, Tokenizer)
                      else (lambda t, tok=tok: tok(t, add_special_tokens=False)["input_ids"]))
            bad = [t for t, ref in zip(texts, reference, strict=True) if encode(t) != ref]
            print(f"{name}: {len(bad)} texts with ids different from ours")


if __name__ == "__main__":
    main()
