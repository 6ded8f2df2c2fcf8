"""Plain-text corpora (JSON lines / JSON / parquet with a text column) -> `text` samples.

Documents longer than `max_chars` are cut into pieces at paragraph, line or word
boundaries: the encoder drops samples longer than the sequence length, so an uncut long
document would be lost whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from data_recipes.common import Converted, Skip
from data_recipes.runner import Converter
from data_recipes.wds import iter_table


def split_text(text: str, max_chars: int) -> list[str]:
    """Pieces of at most `max_chars`, cut at the last paragraph/line/space break."""
    pieces = []
    while len(text) > max_chars:
        window = text[:max_chars]
        cuts = (window.rfind(sep) for sep in ("\n\n", "\n", " "))
        # The first break that keeps a piece of useful length; else cut hard.
        cut = next((c for c in cuts if c > max_chars // 4), max_chars)
        pieces.append(text[:cut].strip())
        text = text[cut:]
    pieces.append(text.strip())
    return [p for p in pieces if p]


class TextJSONL(Converter):
    name = "text"
    task = "text"
    source_exts = (".jsonl", ".jsonl.gz", ".json", ".parquet")

    def __init__(self, src: str, field: str = "text", max_chars: int = 4000,
                 min_chars: int = 1, source: str = "text"):
        self.src, self.field, self.source = src, field, source
        self.max_chars, self.min_chars = max_chars, min_chars

    def items(self) -> Iterator[Any]:
        index = 0
        for path in self.source_files():
            for row in iter_table(path, [self.field]):
                yield index, row.get(self.field) if isinstance(row, dict) else None
                index += 1

    def item_key(self, item: Any) -> str:
        return f"{item[0]:09d}"

    def convert(self, item: Any) -> list[Converted]:
        index, text = item
        if not isinstance(text, str):
            raise Skip("no_text")
        text = text.strip()
        if len(text) < self.min_chars:
            raise Skip("empty_text")
        return [Converted(f"{index:09d}_{i}", {"task": "text", "source": self.source,
                                               "text": piece})
                for i, piece in enumerate(split_text(text, self.max_chars))]
