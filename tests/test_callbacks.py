"""Trainer callbacks: built from the `callbacks` config entries, run in order, and a bad
entry stops the launch with one message naming it."""

from __future__ import annotations

import pytest
import torch

from qwenvl_train.config import ConfigError, load_config
from qwenvl_train.training.callbacks import CallbackList, TrainerCallback, load_callbacks


class AddOne(TrainerCallback):
    def on_loss(self, trainer, step, loss):
        return loss + 1


class Double(TrainerCallback):
    def on_loss(self, trainer, step, loss):
        return loss * 2


def test_config_entries_build_callbacks_with_their_arguments():
    cfg = load_config(["callbacks=[test_callbacks.AddOne,"
                       "{_target_:tests.plugins.faults.KillAfterStep,step:7}]"])
    add, kill = load_callbacks(cfg.callbacks)
    assert type(add) is AddOne and kill.step == 7 and isinstance(kill, TrainerCallback)


def test_on_loss_passes_the_loss_through_the_callbacks_in_order():
    chain = CallbackList([AddOne(), Double()])
    assert float(chain.on_loss(None, 1, torch.tensor(3.0))) == 8.0
    assert float(CallbackList().on_loss(None, 1, torch.tensor(3.0))) == 3.0


@pytest.mark.parametrize("entry, message", [
    ("no_such_package.Hook", "cannot import 'no_such_package'"),
    ("test_callbacks.Missing", "has no class or function 'Missing'"),
    ("Hook", "not a dotted name"),
    ("torch.nn.Linear", "torch.nn.Linear() failed"),
    ("collections.OrderedDict", "not a TrainerCallback"),
    ({"_target_": "tests.plugins.faults.NanLoss", "stp": 3}, "unexpected keyword"),
    ({"step": 3}, "neither"),
])
def test_a_bad_entry_is_refused_naming_it(entry, message):
    with pytest.raises(ConfigError, match=r"callbacks\[1\]") as err:
        load_callbacks(["test_callbacks.AddOne", entry])
    assert message in str(err.value)


def test_cli_refuses_an_unimportable_callback_before_starting(run_cli, tmp_path, demo_data):
    proc = run_cli("qwenvl_train.cli.train", ["callbacks=[no_such_package.Hook]",
                                              f"data.root={demo_data}", f"run_dir={tmp_path}/run"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "callbacks[0]: cannot import 'no_such_package'" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "checkpoints").exists()
