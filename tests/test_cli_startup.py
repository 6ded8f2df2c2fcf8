"""Help and rejected arguments answer without loading the model stack (torch, transformers,
deepspeed): `qwenvl-train`'s are in test_config.py. Timing: scripts/bench_startup.py."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("module, args, returncode, says", [
    ("qwenvl_train.cli.data", ["--help"], 0, "{inspect,convert,demo}"),
    ("qwenvl_train.cli.data", ["inspect", "--help"], 0, "--draw DIR"),
    ("qwenvl_train.cli.data", ["inspect", "x.tar", "--stage", "bogus"], 2, "invalid choice"),
    ("qwenvl_train.cli.eval", ["--help"], 0, "{caption,vqa,grounding,chat}"),
    ("qwenvl_train.cli.eval", ["--export", "x", "--shards", "y", "--task", "ocr"], 2,
     "invalid choice: 'ocr'"),
])
def test_help_and_bad_arguments_import_neither_torch_nor_transformers(
        probe_cli, module, args, returncode, says):
    proc, heavy = probe_cli(module, args)
    assert proc.returncode == returncode, proc.stderr[-2000:]
    assert says in proc.stdout + proc.stderr
    assert heavy == []
