import pytest

from qwenvl_train.config import ConfigError, load_config

# docs/recipe.md's stage table.
PAPER = {
    "pretrain": dict(trainable=["vit", "adapter"], image_size=224, seq_len=512, lr=2e-4,
                     min_lr=1e-6, warmup=500, decay=0.95, batch=30720, steps=50000, pack=False),
    "multitask": dict(trainable=["vit", "adapter", "llm"], image_size=448, seq_len=2048, lr=5e-5,
                      min_lr=1e-5, warmup=400, decay=0.95, batch=4096, steps=19000, pack=True),
    "sft": dict(trainable=["adapter", "llm"], image_size=448, seq_len=2048, lr=1e-5,
                min_lr=1e-6, warmup=3000, decay=1.0, batch=128, steps=8000, pack=False),
}


@pytest.mark.parametrize("stage", list(PAPER))
def test_stage_configs_match_the_paper(stage):
    cfg = load_config([f"stage={stage}", "model=qwenvl_7b"])
    p, s = PAPER[stage], cfg.stage
    assert s.trainable == p["trainable"] and s.pack == p["pack"]
    assert (s.image_size, s.seq_len, s.global_batch_size, s.steps) == (
        p["image_size"], p["seq_len"], p["batch"], p["steps"])
    o = s.optim
    assert (o.lr, o.min_lr, o.warmup_steps, o.vit_layer_decay) == (
        p["lr"], p["min_lr"], p["warmup"], p["decay"])
    assert (o.betas, o.eps, o.weight_decay, o.grad_clip, o.schedule) == (
        [0.9, 0.98], 1e-6, 0.05, 1.0, "cosine")
    assert s.precision == "bf16" and o.lr_multiplier == 1.0 and o.peak_lr == p["lr"]


def test_qwenvl_7b_sizes():
    m = load_config(["model=qwenvl_7b"]).model
    assert (m.vision.width, m.vision.layers, m.vision.heads, m.vision.mlp_dim) == (
        1664, 48, 16, 8192)
    assert (m.adapter.num_queries, m.adapter.embed_dim, m.adapter.heads) == (256, 4096, 32)
    assert (m.llm.hidden_size, m.llm.num_layers, m.llm.num_heads, m.llm.intermediate_size,
            m.llm.vocab_size) == (4096, 32, 32, 11008, 151936)


@pytest.mark.parametrize("override, key", [
    ("+stage.not_a_key=1", "stage.not_a_key"),
    ("stage.image_size=abc", "stage.image_size"),
    ("parallel.zero_stage=5", "parallel.zero_stage"),
    ("stage.template=chat", "stage.template"),
    ("stage.trainable=[vit,decoder]", "stage.trainable"),
    ("nan_policy=ignore", "nan_policy"),
    ("stage.optim.min_lr=1.0", "stage.optim.min_lr"),
    ("+parallel.deepspeed.scheduler={type:WarmupLR}", "parallel.deepspeed.scheduler"),
    ("stage.image_size=230", "stage.image_size"),
    ("tracking.mode=sometimes", "tracking.mode"),
])
def test_bad_values_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config([override])
    assert key in str(err.value)


def test_global_batch_must_split_into_micro_batches_and_ranks():
    cfg = load_config(["scale=demo", "stage.global_batch_size=8", "stage.micro_batch_size=4"])
    assert cfg.stage.grad_accumulation_steps(dp_size=1) == 2
    assert cfg.stage.grad_accumulation_steps(dp_size=2) == 1
    with pytest.raises(ConfigError, match="stage.global_batch_size"):
        cfg.stage.grad_accumulation_steps(dp_size=3)


def test_cli_rejects_bad_config_before_starting(run_cli, tmp_path):
    proc = run_cli("qwenvl_train.cli.train", ["parallel.zero_stage=7",
                                              f"run_dir={tmp_path}/run"])
    assert proc.returncode == 2
    assert "parallel.zero_stage" in proc.stderr and "[0, 1, 2, 3]" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_stage_yamls_set_only_what_differs_from_the_optimizer_defaults():
    import yaml

    from qwenvl_train.config import CONFIG_DIR

    for path in (CONFIG_DIR / "stage").glob("*.yaml"):
        optim = yaml.safe_load(path.read_text())["optim"]
        assert set(optim) <= {"lr", "min_lr", "warmup_steps", "vit_layer_decay"}, path.name
    # Every schema key can be overridden, listed in a YAML or not.
    assert load_config(["stage.optim.grad_clip=0.5"]).stage.optim.grad_clip == 0.5


def test_launch_check_names_the_demo_command_for_an_empty_data_root(tmp_path):
    from qwenvl_train.config import validate_launch

    cfg = load_config(["scale=demo", f"data.root={tmp_path}"])
    with pytest.raises(ConfigError, match=f"data.root: .*qwenvl-data demo --out {tmp_path}"):
        validate_launch(cfg, world_size=1)
    for name in cfg.data.sources:  # every source of data=demo must match a shard
        (tmp_path / f"{name}-00000.tar").touch()
    assert validate_launch(cfg, world_size=2) == 1  # global 4 = micro 2 x 1 x dp 2


@pytest.mark.parametrize("override, returncode, says", [
    ("stage=bogus", 2, "stage: 'bogus' is not allowed; choose one of ['multitask', 'pretrain', "
                       "'sft']"),                                  # a group option
    ("stage.lr=abc", 2, "stage.lr: no such key; stage has ["),      # a key of no schema
    ("stage.optim.lr=abc", 2, "stage.optim.lr: Value 'abc'"),       # the schema's type
    ("parallel.zero_stage=7", 2, "parallel.zero_stage"),            # allowed values
    ("data.root={empty}", 2, "qwenvl-data demo --out"),             # the launch check
    ("--help", 0, "Configuration groups"),
])
def test_rejecting_a_config_imports_neither_torch_nor_transformers(override, returncode,
                                                                    says, tmp_path, probe_cli):
    args = [override.format(empty=tmp_path / "empty"), f"run_dir={tmp_path}/run"]
    proc, heavy = probe_cli("qwenvl_train.cli.train", args)
    assert proc.returncode == returncode, proc.stderr[-2000:]
    assert says in proc.stdout + proc.stderr
    assert heavy == []
    if returncode == 2:  # our one line, no Hydra text
        assert proc.stderr.count("\n") == 1 and "HYDRA_FULL_ERROR" not in proc.stderr
    assert not (tmp_path / "run").exists()
