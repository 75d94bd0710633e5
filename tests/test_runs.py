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


def test_sigint_finishes_the_step_checkpoints_and_resumes_exactly(tmp_path):
    """Ctrl-C inside fit(): the step in flight completes, a checkpoint is written at it, KeyboardInterrupt is raised;
    re-running resumes to the same weights as an uninterrupted run."""
    import signal

    from cdp.runs import RunDir
    from cdp.training.agents import DiffusionBC
    from cdp.training.trainer import fit

    def make():
        torch.manual_seed(0)
        pol = DiffusionPolicy(DiffusionPolicyConfig(obs_dim=3, action_dim=2, network_kwargs={"hidden": 16, "n_layers": 2},
                                                    contraction={"weight": 0.1, "max_samples": 4}))
        g = torch.Generator().manual_seed(0)
        return DiffusionBC(pol, steps=12, lr=1e-3, generator=g), g

    gd = torch.Generator().manual_seed(1)
    data = {"observations": torch.randn(64, 3, generator=gd), "actions": torch.rand(64, 2, generator=gd) * 2 - 1}
    ref, g = make()
    fit(ref, data, steps=12, batch_size=8, generator=g, progress=False)

    agent, g = make()
    run = RunDir(tmp_path / "run", tensorboard=False)

    def interrupt_at_5(step, a):
        if step == 5:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt, match="after step 5"):
        fit(agent, data, steps=12, batch_size=8, generator=g, run=run, callback=interrupt_at_5, log_every=1,
            progress=False)
    _, meta, _ = load_checkpoint(tmp_path / "run" / "checkpoints" / "last")
    assert meta["step"] == 5
    resumed, g = make()
    res = fit(resumed, data, steps=12, batch_size=8, generator=g, run=RunDir(tmp_path / "run", tensorboard=False),
              progress=False)
    assert res["start"] == 5
    for a, b in zip(ref.policy.state_dict().values(), resumed.policy.state_dict().values()):
        assert torch.equal(a, b)


def test_a_kill_between_the_two_renames_is_recovered(tmp_path):
    """save_checkpoint moves ``last`` to ``.last.old`` before moving the new folder in; a kill in between leaves no
    ``last``: the next read puts the complete old checkpoint back, and orphan temporary folders are removed."""
    from cdp.runs import recover_checkpoint

    ck = _checkpoint(tmp_path)
    os.replace(ck, ck.with_name(".ckpt.old"))
    (tmp_path / ".ckpt.tmpabc").mkdir()
    tensors, meta, state = load_checkpoint(ck)
    assert ck.exists() and not (tmp_path / ".ckpt.old").exists() and not (tmp_path / ".ckpt.tmpabc").exists()
    assert state["ema_updates"] == 3
    recover_checkpoint(ck)  # idempotent
    assert ck.exists()


def test_two_processes_on_one_run_folder_are_refused(tmp_path):
    import subprocess
    import sys

    from cdp.runs import RunDir

    run = RunDir(tmp_path / "run", tensorboard=False, lock=True)
    code = ("import sys; from cdp.runs import RunDir\n"
            "try:\n    RunDir(sys.argv[1], tensorboard=False, lock=True)\nexcept ValueError as e:\n"
            "    print(e); sys.exit(3)\n")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True)
    assert p.returncode == 3 and "in use by another cdp process" in p.stdout
    RunDir(tmp_path / "run", tensorboard=False, lock=True).close()  # re-entrant in the same process
    run.close()
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout


def test_run_folder_that_is_a_file_is_one_clear_error(tmp_path):
    from cdp.runs import RunDir

    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        RunDir(tmp_path / "f")
