"""The run-folder / checkpoint module (cdp.runs): safe loading of trainer state."""

import os
from pathlib import Path

import pytest
import torch

from cdp.policy import DiffusionPolicy, DiffusionPolicyConfig
from cdp.runs import load_checkpoint, load_policy, save_policy


class _Payload:
    """An object whose unpickling runs a command (the attack a ``weights_only=False`` load allows)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _checkpoint(tmp_path: Path) -> Path:
    pol = DiffusionPolicy(DiffusionPolicyConfig(obs_dim=3, action_dim=2))
    opt = torch.optim.AdamW(pol.parameters())
    return save_policy(tmp_path / "ckpt", pol, state={"optimizer": opt.state_dict(),
                                                        "generator": torch.Generator().get_state(), "ema_updates": 3})


def test_plain_trainer_state_round_trips(tmp_path):
    ck = _checkpoint(tmp_path)
    _, meta, state = load_checkpoint(ck)
    assert state["ema_updates"] == 3 and state["generator"].dtype == torch.uint8
    assert load_checkpoint(ck, with_state=False)[2] is None


def test_pickled_code_in_state_is_refused_and_not_run(tmp_path):
    ck = _checkpoint(tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"optimizer": _Payload(str(marker))}, ck / "state.pt")
    with pytest.raises(ValueError, match="refusing .*state.pt"):
        load_checkpoint(ck)
    assert not marker.exists()
    load_policy(ck)  # evaluation never reads state.pt
    assert not marker.exists()


def test_damaged_state_is_one_clear_error(tmp_path):
    ck = _checkpoint(tmp_path)
    (ck / "state.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a plain trainer state"):
        load_checkpoint(ck)
