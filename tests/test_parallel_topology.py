"""Layout validation, the parallel config files, and the compute-balanced pipeline split
(single process, no process group)."""

from __future__ import annotations

import copy
import itertools
import random
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from qwenvl_train.model.config import QwenVLConfig
from qwenvl_train.training.observe import flops
from qwenvl_train.training.parallel.config import ParallelConfig
from qwenvl_train.training.parallel.partition import balanced_parts, plan_split
from qwenvl_train.training.parallel.topology import ParallelSizes, validate_parallel

CONFIGS = Path(__file__).resolve().parents[1] / "qwenvl_train" / "configs"
Q7B = QwenVLConfig.from_dict(OmegaConf.load(CONFIGS / "model" / "qwenvl_7b.yaml"))


def _par(pp=1, tp=1, zero=1) -> ParallelConfig:
    return ParallelConfig(pp=pp, tp=tp, zero_stage=zero)


def launch_sizes(par: ParallelConfig, world: int, model: QwenVLConfig = Q7B) -> ParallelSizes:
    """What a launch checks: the config's rules (to_schema), then the world size."""
    par.validate("parallel", model)
    return validate_parallel(par, world)


def test_valid_layouts_give_sizes():
    assert launch_sizes(_par(2, 2), 8) == ParallelSizes(pp=2, tp=2, dp=2)
    assert launch_sizes(_par(1, 1, zero=3), 4) == ParallelSizes(1, 1, 4)
    assert launch_sizes(_par(1, 2, zero=2), 2).dp == 1


@pytest.mark.parametrize("par, world, key", [
    (_par(pp=3), 8, "parallel.pp x parallel.tp"),  # does not divide the world
    (_par(pp=2, tp=2), 6, "parallel.pp x parallel.tp"),
    (_par(pp=2, zero=2), 4, "parallel.zero_stage"),  # ZeRO-2/3 with a pipeline
    (_par(pp=2, zero=0), 4, "parallel.zero_stage"),
    (_par(tp=2, zero=3), 4, "parallel.zero_stage"),
    (_par(pp=33), 33, "parallel.pp"),  # more stages than decoder layers
    (_par(pp=0), 4, "parallel.pp"),
    (_par(tp=3), 3, "model.llm.num_heads"),  # 32 heads / 3
])
def test_invalid_layouts_name_the_key(par, world, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        launch_sizes(par, world)


def test_tp_must_divide_kv_heads_and_vit_heads():
    cfg = copy.deepcopy(Q7B)
    cfg.llm.num_kv_heads = 4
    with pytest.raises(ValueError, match=r"model\.llm\.num_kv_heads"):
        launch_sizes(_par(tp=8), 8, cfg)
    with pytest.raises(ValueError, match=r"model\.vision\.heads"):  # ViT-bigG has 16 heads
        launch_sizes(_par(tp=32), 32)


def test_tied_embeddings_rejected_with_pipeline():
    tied = QwenVLConfig.from_dict({"llm": {"tie_word_embeddings": True, "num_layers": 4}})
    with pytest.raises(ValueError, match=r"tie_word_embeddings"):
        launch_sizes(_par(pp=2), 2, tied)


@pytest.mark.parametrize("name", ["pp2", "tp2", "pp2_tp2", "pp4", "pp8"])
def test_parallel_config_files(name):
    raw = OmegaConf.load(CONFIGS / "parallel" / f"{name}.yaml")
    single = OmegaConf.load(CONFIGS / "parallel" / "single.yaml")
    assert set(raw) == set(single)
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ParallelConfig), raw))
    world = cfg.pp * cfg.tp * 2
    assert launch_sizes(cfg, world).dp == 2


def test_balanced_parts_is_optimal():
    rng = random.Random(0)
    for _ in range(60):
        costs = [rng.choice([1.0, 2.0, 3.0, 10.0, 0.5]) for _ in range(rng.randint(2, 9))]
        k = rng.randint(1, len(costs))
        parts = balanced_parts(costs, k)
        assert parts[0] == 0 and parts[-1] == len(costs) and len(parts) == k + 1
        assert all(a < b for a, b in itertools.pairwise(parts))
        got = max(sum(costs[a:b]) for a, b in itertools.pairwise(parts))
        best = min(
            max(sum(costs[a:b]) for a, b in itertools.pairwise((0, *cuts, len(costs))))
            for cuts in itertools.combinations(range(1, len(costs)), k - 1))
        assert got == pytest.approx(best)


def test_split_costs_match_flops_model():
    split = plan_split(Q7B, 4, 224, 512, ("vit", "adapter"), images=1)
    want = flops.step_flops(Q7B, 224, tokens=512, images=1, seq_len=512,
                            trainable=("vit", "adapter"))
    assert sum(split.layer_cost) == pytest.approx(want, rel=1e-9)
    assert split.layer_names[0] == "vision+embed" and split.layer_names[-1] == "norm+head"
    assert len(split.parts) == 5 and split.parts[0] == 0 and split.parts[-1] == 34
    # 224px: the ViT is cheap enough to share stage 0 with decoder layers, and balance is good.
    assert split.parts[1] > 1
    worst = max(split.stage_cost(s) for s in range(4))
    assert sum(split.layer_cost) / 4 / worst > 0.9


def test_448px_packed_puts_the_vit_alone_on_stage_zero():
    split = plan_split(Q7B, 8, 448, 2048, ("vit", "adapter", "llm"), pack=True)
    assert split.parts[1] == 1
    rest = [split.stage_cost(s) for s in range(1, 8)]
    assert max(rest) / min(rest) < 1.1  # the stages behind the ViT stay even
    assert "vision layer alone" in split.describe()


def test_pipeline_split_script(capsys):
    import runpy

    mod = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" /
                             "pipeline_split.py"))
    assert mod["main"](["--pp", "4", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count("== qwenvl_7b, pp=") == 4 and "stage 7:" in out
