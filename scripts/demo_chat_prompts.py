"""Write the prompts `make demo` asks the demo SFT model (`qwenvl-chat --batch`).

    python scripts/demo_chat_prompts.py --out runs/demo/chat

A rendered scene the model has not seen (the demo set's own generator, another seed) as
`scene.png`, and `prompts.jsonl` asking where one of its shapes is, in the words of the demo
dialogues ("Where is the red circle?"), with the true pixel box beside it (`reference`;
qwenvl-chat ignores unknown keys).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from data_recipes.demo import scenes

HELD_OUT_SEED = 20_240_917  # the demo set's generators use seeds 1000..1007


def write_prompts(out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(HELD_OUT_SEED)
    scene = scenes.make_scene(rng)
    scene.image.save(out / "scene.png")
    target = next((o, e) for o in scene.objects if (e := scenes.referring_expressions(scene, o)))
    obj, expressions = target
    line = {"id": "where", "images": ["scene.png"], "text": f"Where is {expressions[0]}?",
            "reference": {"ref": expressions[0], "box": list(obj.box)}}
    path = out / "prompts.jsonl"
    path.write_text(json.dumps(line) + "\n")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for scene.png and prompts.jsonl")
    print(write_prompts(p.parse_args().out))


if __name__ == "__main__":
    main()
