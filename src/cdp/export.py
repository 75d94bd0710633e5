"""Export a trained :class:`~cdp.policy.DiffusionPolicy` as a self-contained TorchScript or ONNX file (``cdp export``).

The exported module holds the normalisers, the denoiser (EMA weights, the plain eval forward) and the sampler loop
unrolled over the checkpoint's fixed inference steps, with every per-step constant (time inputs, precomputed time
embeddings, α/σ coefficients) baked in. It runs with torch alone (TorchScript) or onnxruntime alone (ONNX):

* inputs: ``obs`` (B, To, Do) unnormalised observations and ``noise`` (B, *action_shape) the initial sample
  (standard normal); for the stochastic DDPM sampler a third input ``step_noise`` (n_steps, B, *action_shape), the
  per-step noise (row i is step i's; the last row is unused, the last step returns x̂0).
* output: ``action`` (B, *action_shape) unnormalised, action_shape = (Da,) for horizon 1 else (H, Da) — the whole
  chunk; executing actions [To-1, To-1+Ta) of it is what :meth:`~cdp.policy.DiffusionPolicy.select_action` does.

DDIM and DPM-Solver++ are deterministic given ``noise``, so the output equals ``policy.sample(obs, noise=noise)``
(tested to 1e-5). The module is traced (``torch.jit.trace``, batch 2) for a fixed number of steps; the batch size is
free. Size-dependent fast paths are fixed by the trace (the MLP's Mish is ``F.mish``, equal to 1e-6 to the 5-op form
larger batches use in ``cdp``). ONNX goes through ``torch.onnx.export(dynamo=False)``, opset 17.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

FORMATS = ("torchscript", "onnx")


class ExportedPolicy(nn.Module):
    """A policy's sampling path in plain tensor ops: normalise obs → unrolled sampler → clip → unnormalise.

    Args:
        policy: a :class:`~cdp.policy.DiffusionPolicy` (eval mode; its weights are copied by reference).
        sampler / num_inference_steps: override the policy's configured sampler and steps (None: the policy's).
    """

    def __init__(self, policy, sampler: str | None = None, num_inference_steps: int | None = None) -> None:
        super().__init__()
        c = policy.config
        self.config = c
        self.sampler_name = sampler or c.sampler
        steps = num_inference_steps if num_inference_steps is not None else c.num_inference_steps
        # a fresh sampler (never the policy's cached one: DPM-Solver++ keeps a history between steps)
        from .samplers import make_sampler
        self.sampler = make_sampler(self.sampler_name, policy.schedule, c.prediction, c.clip_sample, steps)
        self.net = policy.net
        self.obs_normalizer = policy.obs_normalizer
        self.action_normalizer = policy.action_normalizer
        self.action_shape = tuple(policy.action_shape)
        self.n_steps = len(self.sampler.timesteps)
        ts = (self.sampler.timesteps.to(torch.float64) / self.sampler.schedule.num_steps).to(torch.float32)
        self.register_buffer("ts", ts)
        self.has_temb = hasattr(self.net, "embed_time")
        if self.has_temb:  # as policy._cached_time_denoiser: one (1, time_dim) embedding per step
            with torch.no_grad():
                embs = torch.cat([self.net.embed_time(ts[i:i + 1]) for i in range(self.n_steps)])
            self.register_buffer("t_embs", embs)

    @property
    def stochastic(self) -> bool:
        """True for DDPM (then ``forward`` needs ``step_noise``)."""
        return self.sampler_name == "ddpm"

    def forward(self, obs: torch.Tensor, noise: torch.Tensor, step_noise: torch.Tensor | None = None) -> torch.Tensor:
        """obs (B, To, Do) unnormalised, noise (B, *action_shape), step_noise (n_steps, B, *action_shape) for DDPM →
        unnormalised actions (B, *action_shape)."""
        B = obs.shape[0]
        cond = self.obs_normalizer.normalize(obs).reshape(B, -1)
        a = noise
        for i in range(self.n_steps):
            t = self.ts[i].expand(B)
            if self.has_temb:
                out = self.net(a, t, cond, t_emb=self.t_embs[i:i + 1])
            else:
                out = self.net(a, t, cond)
            a = self.sampler.step(out, i, a, noise=None if step_noise is None else step_noise[i])
        clip = self.config.clip_sample
        if clip is not None:
            a = a.clamp(-clip, clip)
        return self.action_normalizer.unnormalize(a)

    def example_inputs(self, batch: int = 2) -> tuple[torch.Tensor, ...]:
        """Random inputs of the right shapes (for tracing): (obs, noise[, step_noise])."""
        c = self.config
        g = torch.Generator().manual_seed(0)
        obs = self.obs_normalizer.unnormalize(torch.randn(batch, c.n_obs_steps, c.obs_dim, generator=g))
        noise = torch.randn((batch,) + self.action_shape, generator=g)
        if self.stochastic:
            return obs, noise, torch.randn((self.n_steps, batch) + self.action_shape, generator=g)
        return obs, noise


def _exportable(policy, sampler, num_inference_steps) -> ExportedPolicy:
    from .policy import DiffusionPolicy
    if not isinstance(policy, DiffusionPolicy):
        raise ValueError(f"cdp export handles DiffusionPolicy checkpoints, not {type(policy).__name__}")
    return ExportedPolicy(policy.eval(), sampler, num_inference_steps).eval()


def export_policy(policy, out: str | Path, fmt: str = "torchscript", sampler: str | None = None,
                  num_inference_steps: int | None = None) -> Path:
    """Write ``policy`` (a :class:`~cdp.policy.DiffusionPolicy`) as a TorchScript (``.pt``) or ONNX file.

    Args:
        policy: the policy to export (e.g. :func:`cdp.runs.load_policy`'s EMA policy).
        out: output file. fmt: ``"torchscript"`` or ``"onnx"`` (needs the ``onnx`` package; opset 17, dynamic batch).
        sampler / num_inference_steps: override the policy's sampler and its steps.
    Returns:
        the written path. Inputs / outputs: see the module docstring (names ``obs``, ``noise``[, ``step_noise``]
        → ``action``).
    Raises:
        ValueError: unknown format, not a DiffusionPolicy, or invalid sampler settings.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {FORMATS}")
    mod = _exportable(policy, sampler, num_inference_steps)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    example = mod.example_inputs()
    import warnings
    with torch.no_grad(), warnings.catch_warnings():
        # the networks' shape checks are Python branches on shapes: traced once, they hold for any batch size
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        if fmt == "torchscript":
            traced = torch.jit.trace(mod, example, check_trace=False)
            traced.save(str(out))
        else:
            names = ["obs", "noise", "step_noise"][:len(example)]
            axes = {n: {0: "batch"} for n in names[:2]}
            if len(example) == 3:
                axes["step_noise"] = {1: "batch"}
            axes["action"] = {0: "batch"}
            torch.onnx.export(mod, example, str(out), input_names=names, output_names=["action"],
                              dynamic_axes=axes, opset_version=17, dynamo=False)
    return out


def export_checkpoint(checkpoint: str | Path, out: str | Path, fmt: str = "torchscript", sampler: str | None = None,
                      num_inference_steps: int | None = None) -> Path:
    """:func:`export_policy` of the EMA policy in the checkpoint folder ``checkpoint`` (:func:`cdp.runs.load_policy`)."""
    from .runs import load_policy
    return export_policy(load_policy(checkpoint), out, fmt, sampler, num_inference_steps)
