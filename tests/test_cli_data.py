"""`qwenvl-data`: the recipes plug in through an entry point; the core never imports them."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import qwenvl_train
from qwenvl_train.cli.data import command_plugins, main


def test_recipe_commands_arrive_through_the_entry_point_group(tmp_path, capsys):
    assert [p.value for p in command_plugins()] == ["data_recipes.cli:register"]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"document {i}."}) + "\n" for i in range(3)))
    rc = main(["convert", "text", "--src", str(src), "--out", str(tmp_path / "out"),
               "--source", "web"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["tasks"] == {"text": 3}
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["text-00000-00000.tar"]


def test_the_core_never_imports_data_recipes():
    root = Path(qwenvl_train.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] == "data_recipes" for n in names):
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert offenders == []
