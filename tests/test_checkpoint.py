"""The checkpoint convention both networks share (models/checkpoint.py): hash beside the file,
STM-Net's earlier hash name found once with a warning, one key layout written and both read,
one-line errors; and the progress lines a training command shows (models.console_progress)."""

from __future__ import annotations

import logging
import shutil
import sys

import numpy as np
import pytest
import torch

from stm_live.models import console_progress
from stm_live.models.checkpoint import (
    card_command,
    hash_path,
    load_checkpoint,
    resolve_device,
    save_checkpoint,
    sha256_of,
    verify,
)
from stm_live.models.stmnet import DEFAULT_CHECKPOINT, load_stmnet
from stm_live.models.tipstate import DEFAULT_WEIGHTS


def _build(weights, config):
    net = torch.nn.Linear(config["n_in"], config["n_out"])
    net.load_state_dict(weights)
    return net


def test_the_hash_sits_beside_the_file_under_its_full_name():
    assert hash_path(DEFAULT_CHECKPOINT).name == "stmnet.pt.sha256"
    for shipped in (DEFAULT_CHECKPOINT, DEFAULT_WEIGHTS):
        assert hash_path(shipped).is_file(), f"{hash_path(shipped).name} is not shipped"
        assert hash_path(shipped).read_text().split()[0] == sha256_of(shipped)
    assert not DEFAULT_CHECKPOINT.with_suffix(".sha256").exists()  # the old name is gone from the tree


def test_an_old_named_hash_file_loads_and_warns_once(tmp_path, caplog):
    ckpt = tmp_path / "stmnet.pt"
    shutil.copy(DEFAULT_CHECKPOINT, ckpt)
    shutil.copy(hash_path(DEFAULT_CHECKPOINT), tmp_path / "stmnet.sha256")  # STM-Net's earlier name
    with caplog.at_level(logging.WARNING, logger="stm_live.models.checkpoint"):
        first = load_stmnet(device="cpu", path=ckpt)
        load_stmnet(device="cpu", path=ckpt)
    warnings = [r.getMessage() for r in caplog.records if r.name == "stm_live.models.checkpoint"]
    assert len(warnings) == 1, warnings
    assert "stmnet.sha256" in warnings[0] and "rename it to stmnet.pt.sha256" in warnings[0]
    assert "\n" not in warnings[0]
    assert first.info["sha256"] == sha256_of(DEFAULT_CHECKPOINT)


def test_saved_checkpoints_use_one_layout_and_both_layouts_load(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    path = tmp_path / "net.pt"
    digest = save_checkpoint(path, net, {"n_in": 3, "n_out": 2}, steps=5, seed=1)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert set(state) == {"state_dict", "config", "steps", "seed"} and state["config"] == {"n_in": 3, "n_out": 2}
    assert digest == sha256_of(path) == hash_path(path).read_text().split()[0]
    assert not list(tmp_path.glob("*.tmp"))
    back, info = load_checkpoint(path, _build, what="test net", fix="make another")
    for a, b in zip(back.state_dict().values(), net.state_dict().values()):
        assert torch.equal(a, b)
    assert info == {"config": {"n_in": 3, "n_out": 2}, "steps": 5, "seed": 1, "sha256": digest}
    # the tip classifier's shipped file keeps its earlier layout (weights under "model", config as JSON)
    shipped = torch.load(DEFAULT_WEIGHTS, map_location="cpu", weights_only=True)
    assert "model" in shipped and isinstance(shipped["config"], str)
    _, info = load_checkpoint(DEFAULT_WEIGHTS, lambda weights, config: torch.nn.Module(), what="w", fix="f")
    assert isinstance(info["config"], dict) and info["config"]["size"] == 64 and "model" not in info


def test_bad_checkpoints_get_one_line_errors_naming_the_fix(tmp_path):
    path = tmp_path / "net.pt"
    with pytest.raises(FileNotFoundError, match=r"test net not found at .*net\.pt; make another"):
        verify(path, what="test net", fix="make another")
    save_checkpoint(path, torch.nn.Linear(3, 2), {"n_in": 3, "n_out": 2})
    with pytest.raises(ValueError, match=r"could not be loaded \(.*size mismatch.*\); make another") as err:
        load_checkpoint(path, lambda w, c: _build(w, {"n_in": 4, "n_out": 2}), what="test net", fix="make another")
    assert "\n" not in str(err.value)  # torch's message runs over lines; the error is one
    path.write_bytes(b"not a checkpoint")
    hash_path(path).write_text(f"{sha256_of(path)}  net.pt\n")  # a matching hash: the load itself fails
    with pytest.raises(ValueError, match=r"test net .*net\.pt could not be loaded"):
        load_checkpoint(path, _build, what="test net", fix="make another")
    hash_path(path).write_text("0" * 64 + "  net.pt\n")
    with pytest.raises(ValueError, match=r"corrupt or modified: sha256 .* does not match net\.pt\.sha256"):
        verify(path, what="test net", fix="make another")
    hash_path(path).unlink()
    with pytest.raises(ValueError, match=r"hash file missing .*make another") as err:
        verify(path, what="test net", fix="make another")
    assert "\n" not in str(err.value)


def test_device_and_card_command(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(sys, "argv", ["/x/bin/stm-live", "train", "--out", "/tmp/c.pt", "--steps", "2"])
    assert card_command() == "stm-live train --steps 2"


def test_console_progress_shows_the_training_lines_while_inside(capsys):
    from stm_live.models.tipdata import build_bank

    log = logging.getLogger("stm_live.models.tipdata")
    level, handlers = log.level, list(log.handlers)
    build_bank(2, seed=5)
    assert "rendered" not in capsys.readouterr().out  # a library: silent unless asked
    with console_progress():
        bank = build_bank(2, seed=5)
    assert capsys.readouterr().out.splitlines()[-1].startswith("rendered 2/2 training frames (")
    assert len(bank) == 2 and all(np.isfinite(r.image).all() for r in bank)
    assert (log.level, log.handlers) == (level, handlers)
    build_bank(2, seed=5)
    assert "rendered" not in capsys.readouterr().out
