"""Where each step of the data path runs: the chain of calls (data-package functions only)
from `Stream.__iter__` down to the function that does the step, traced while one stream
makes its first packed stage-2 batch.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python scripts/data_path_depth.py

Prints, per step of loader.py, the depth below `Stream.__iter__` and the call chain; then
the total over the steps. A measurement for the issue on the data path's structure, not a
benchmark.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from data_fixtures import write_task_shards  # noqa: E402

from qwenvl_train.data.config import DataConfig, SourceConfig  # noqa: E402
from qwenvl_train.data.loader import build_loader  # noqa: E402
from qwenvl_train.data.tokenizer import get_tokenizer  # noqa: E402

# function name -> step of loader.py it does
STEPS = {"epoch_shards": 2, "index_tar": 3, "read_record": 4, "parse_record": 5,
         "encode_tokens": 6, "load_image_uint8": 7, "pick": 8, "add": 9, "collate": 10}
PACKAGE = os.path.join("qwenvl_train", "data") + os.sep
ENTRY = "Stream.__iter__"


def chain_of(frame) -> list[str]:
    """Data-package frames from `frame` up to the stream's entry; [] outside a stream."""
    out = []
    while frame is not None:
        if PACKAGE in frame.f_code.co_filename:
            out.append(frame.f_code.co_qualname)
            if out[-1] == ENTRY:
                return out
        frame = frame.f_back
    return []


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        write_task_shards(Path(tmp), ("caption", "vqa"), per_task=12, per_shard=6)
        data = DataConfig(root=tmp, sources={t: SourceConfig(f"{t}-*.tar")
                                             for t in ("caption", "vqa")}, virtual_streams=1)
        loader = build_loader(data, get_tokenizer(), template="multitask", image_size=16,
                              seq_len=96, pack=True, num_image_tokens=4, dp_rank=0,
                              dp_size=1, micro_batch_size=2, seed=0, num_workers=0)
        found: dict[str, list[str]] = {}

        def profile(frame, event, _arg):
            name = frame.f_code.co_name
            if event == "call" and name in STEPS and PACKAGE in frame.f_code.co_filename:
                chain = chain_of(frame)
                if chain and (name not in found or len(chain) < len(found[name])):
                    found[name] = chain

        batches = iter(loader)
        sys.setprofile(profile)
        next(batches)
        sys.setprofile(None)
    total = 0
    for name, step in sorted(STEPS.items(), key=lambda kv: kv[1]):
        chain = found.get(name)
        if chain is None:
            print(f"step {step:>2} {name}: not reached")
            continue
        total += len(chain) - 1
        print(f"step {step:>2} depth {len(chain) - 1}: {' <- '.join(chain)}")
    print(f"total depth over the steps: {total}")


if __name__ == "__main__":
    main()
