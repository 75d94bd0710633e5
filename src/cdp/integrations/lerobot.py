r"""The contraction regulariser on LeRobot's diffusion policy (``lerobot.policies.diffusion``).

Add it to LeRobot training in a few lines (``lerobot/scripts/lerobot_train.py``, ``update_policy``)::

    from cdp.integrations.lerobot import lerobot_contraction_loss, lerobot_regularizer

    reg = lerobot_regularizer(policy, weight=0.1)              # once: schedule + prediction type from the policy
    ...
    loss, output_dict = policy.forward(batch)                  # LeRobot's diffusion loss (batch already normalised)
    loss_c, metrics = lerobot_contraction_loss(policy, batch, reg)
    loss = loss + loss_c                                       # then accelerator.backward(loss) as before

What the adapter maps (read in lerobot 0.4.4, ``src/lerobot/policies/diffusion/modeling_diffusion.py``):

* ``DiffusionModel.compute_loss`` draws integer timesteps ``randint(0, num_train_timesteps)`` of shape (B,),
  noises ``batch["action"]`` (B, horizon, action_dim) with ``noise_scheduler.add_noise`` and calls
  ``self.unet(noisy_trajectory, timesteps, global_cond=global_cond)``, with ``global_cond`` (B, cond_dim) from
  ``_prepare_global_conditioning(batch)``: ``observation.state`` (B, n_obs_steps, state_dim), image features and
  ``observation.environment_state`` concatenated per step, flattened to cond_dim = n_obs_steps · per-step size.
  The target is ε (``prediction_type="epsilon"``) or the clean actions (``"sample"``).
* ``noise_scheduler`` is a diffusers ``DDPMScheduler`` or ``DDIMScheduler`` (``config.noise_scheduler_type``;
  defaults: 100 steps, ``squaredcos_cap_v2``). :meth:`cdp.schedules.NoiseSchedule.from_diffusers` takes its
  ``alphas_cumprod`` as they are.
* Time: cdp's regulariser calls its denoiser at ``t = k / T`` for steps k = 1..T; diffusers' timestep of the same
  noise level is ``k − 1``. :func:`lerobot_denoiser` therefore calls ``unet(x, round(t · T) − 1, global_cond=c)``.

The regulariser (:class:`cdp.contraction.ContractionRegularizer`) draws its own points (a subsample of the batch,
``max_samples``, steps in ``t_range``, fresh noise) from the clean actions, so it is independent of the points of
LeRobot's loss; with ``do_mask_loss_for_padding`` LeRobot masks padded action steps in its loss, while the
regulariser treats a padded chunk as the action sequence it is (the padding repeats the episode's last action).

Only the objects' attributes are used (``unet``, ``noise_scheduler``, ``config``, ``_prepare_global_conditioning``;
a ``DiffusionPolicy`` is unwrapped through its ``diffusion`` attribute); ``lerobot`` itself is never imported.
Installing lerobot 0.4.4 beside cdp: see the README (its pins would downgrade torch; ``pip install --no-deps``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch

from ..contraction import ContractionConfig, ContractionRegularizer, Denoiser
from ..schedules import NoiseSchedule

__all__ = ["diffusion_model_of", "lerobot_schedule", "lerobot_prediction", "lerobot_denoiser",
           "lerobot_regularizer", "lerobot_global_cond", "lerobot_contraction_loss", "LEROBOT_VERSION"]

#: the LeRobot release whose ``modeling_diffusion.py`` this adapter follows (and is tested against when it imports)
LEROBOT_VERSION = "0.4.4"
#: batch keys of LeRobot 0.4.4 (``lerobot.utils.constants``)
ACTION, OBS_IMAGES = "action", "observation.images"
#: the prediction types LeRobot's diffusion policy trains (``DiffusionConfig.__post_init__``), all supported by cdp
PREDICTIONS = ("epsilon", "sample")


def diffusion_model_of(policy: Any) -> Any:
    """The ``DiffusionModel`` of a LeRobot ``DiffusionPolicy`` (its ``diffusion`` attribute), or ``policy`` itself
    when it already is one (has ``unet`` and ``noise_scheduler``).

    Raises:
        TypeError: neither (not a LeRobot diffusion policy / model).
    """
    for obj in (getattr(policy, "diffusion", None), policy):
        if obj is not None and hasattr(obj, "unet") and hasattr(obj, "noise_scheduler"):
            return obj
    raise TypeError(f"{type(policy).__name__} is not a LeRobot DiffusionPolicy / DiffusionModel: expected an object "
                    "with .unet and .noise_scheduler, or one whose .diffusion has them")


def _num_train_timesteps(model: Any) -> int:
    return int(model.noise_scheduler.config.num_train_timesteps)


def lerobot_schedule(policy: Any) -> NoiseSchedule:
    """The policy's noise schedule as cdp's :class:`~cdp.schedules.NoiseSchedule` (T = ``num_train_timesteps``,
    ``alphas_cumprod`` equal to the scheduler's; :meth:`~cdp.schedules.NoiseSchedule.from_diffusers`).

    Raises:
        TypeError: not a LeRobot diffusion policy. ValueError: from ``from_diffusers``.
    """
    return NoiseSchedule.from_diffusers(diffusion_model_of(policy).noise_scheduler)


def lerobot_prediction(policy: Any) -> str:
    """What the policy's UNet predicts: ``noise_scheduler.config.prediction_type``, ``"epsilon"`` or ``"sample"``.

    Raises:
        TypeError: not a LeRobot diffusion policy.
        ValueError: another prediction type (e.g. ``"v_prediction"``, which LeRobot's ``compute_loss`` does not
            train either and cdp's regulariser has no Jacobian convention for), or a ``config.prediction_type``
            that differs from the scheduler's.
    """
    model = diffusion_model_of(policy)
    pred = model.noise_scheduler.config.prediction_type
    own = getattr(getattr(model, "config", None), "prediction_type", pred)
    if pred not in PREDICTIONS:
        raise ValueError(f"the LeRobot policy's noise scheduler has prediction_type {pred!r}; the contraction "
                         f"regulariser supports {PREDICTIONS} here (LeRobot's diffusion loss trains those two only)")
    if own != pred:
        raise ValueError(f"the LeRobot policy's config.prediction_type {own!r} differs from its noise scheduler's "
                         f"{pred!r}")
    return pred


def lerobot_denoiser(policy: Any) -> Denoiser:
    """The policy's UNet as cdp's denoiser callable ``(noisy_action, t, cond) -> prediction``.

    ``noisy_action`` (B, horizon, action_dim) normalised actions, ``t`` (B,) float diffusion times ``k / T``
    (k = 1..T, T = ``num_train_timesteps``), ``cond`` (B, cond_dim) the ``global_cond`` of
    :func:`lerobot_global_cond`; returns ``unet(noisy_action, round(t·T) − 1, global_cond=cond)`` (B, horizon,
    action_dim), ε̂ or x̂0 as the policy's prediction type. The timesteps passed are int64 (LeRobot's dtype) on
    ``t``'s device. A ``t`` between grid points is rounded to the nearest step (cdp's regulariser only uses grid
    points). The callable holds the UNet module, so it always runs with its current weights.

    Raises:
        TypeError: not a LeRobot diffusion policy.
    """
    model = diffusion_model_of(policy)
    unet, T = model.unet, _num_train_timesteps(model)

    def denoiser(noisy_action: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        timesteps = (t.to(torch.float64) * T).round().long() - 1  # cdp step k = t·T → diffusers timestep k − 1
        return unet(noisy_action, timesteps, global_cond=cond)

    return denoiser


def lerobot_regularizer(policy: Any, config: ContractionConfig | None = None, **settings) -> ContractionRegularizer:
    """A :class:`~cdp.contraction.ContractionRegularizer` for the policy: its schedule (:func:`lerobot_schedule`)
    and prediction type (:func:`lerobot_prediction`, which replaces ``config.prediction``).

    Args:
        policy: a LeRobot ``DiffusionPolicy`` or ``DiffusionModel``.
        config: regulariser settings (default :class:`~cdp.contraction.ContractionConfig`: hinge, γ = 0.1, every
            step, 16 regularised samples per batch, exact λ_max up to d = horizon · action_dim = 128).
        **settings: ``ContractionConfig`` fields that override ``config`` (``weight=0.1``, ``margin=...``).
    Raises:
        TypeError: not a LeRobot diffusion policy, or an unknown setting. ValueError: as
            :func:`lerobot_prediction` / :func:`lerobot_schedule`, an invalid setting, or a ``prediction`` setting
            other than the policy's.
    """
    pred = lerobot_prediction(policy)
    if settings.get("prediction", pred) != pred:
        raise ValueError(f"prediction={settings['prediction']!r} given, but the LeRobot policy predicts {pred!r}")
    settings["prediction"] = pred
    cfg = dataclasses.replace(config if config is not None else ContractionConfig(), **settings)
    return ContractionRegularizer(cfg, lerobot_schedule(policy))


def lerobot_global_cond(policy: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``global_cond`` (B, cond_dim) of a training batch, as LeRobot's ``compute_loss`` builds it: the policy's
    ``_prepare_global_conditioning``, after stacking the camera images into ``observation.images`` the way
    ``DiffusionPolicy.forward`` does when the batch does not hold them yet. The graph to an image encoder is kept
    (the regulariser's gradient reaches it, as LeRobot's loss does); in training mode a random crop is drawn anew.

    Raises:
        TypeError: not a LeRobot diffusion policy. KeyError: an input feature of the policy is missing.
    """
    model = diffusion_model_of(policy)
    image_keys = list(getattr(model.config, "image_features", None) or [])
    if image_keys and OBS_IMAGES not in batch:
        batch = dict(batch)
        for key in image_keys:
            if model.config.n_obs_steps == 1 and batch[key].ndim == 4:
                batch[key] = batch[key].unsqueeze(1)
        batch[OBS_IMAGES] = torch.stack([batch[key] for key in image_keys], dim=-4)
    return model._prepare_global_conditioning(batch)


def lerobot_contraction_loss(policy: Any, batch: Mapping[str, torch.Tensor], regularizer: ContractionRegularizer,
                             generator: torch.Generator | None = None, global_cond: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, dict[str, float]]:
    r"""The weighted contraction loss γ·L_c of a LeRobot diffusion policy on one training batch.

    Draws the regulariser's points from the clean action chunks ``batch["action"]`` (B, horizon, action_dim),
    conditions them on ``global_cond`` (B, cond_dim; default :func:`lerobot_global_cond` of ``batch``) and
    evaluates the policy's UNet through :func:`lerobot_denoiser`. The term is computed in float32 with autocast
    off (the Jacobian of a bf16 network is not meaningful at the hinge's scale). Add it to LeRobot's loss:
    ``loss = policy.forward(batch)[0] + loss_c``.

    Args:
        policy: a LeRobot ``DiffusionPolicy`` or ``DiffusionModel`` (lerobot 0.4.4 attributes).
        batch: a normalised training batch as ``policy.forward`` takes it (after LeRobot's preprocessor).
        regularizer: from :func:`lerobot_regularizer` (its schedule and prediction type must be the policy's).
        generator: RNG for the regulariser's points (None: torch's global RNG, as LeRobot's own loss).
        global_cond: precomputed conditioning (B, cond_dim), e.g. to reuse one image encoding.
    Returns:
        (loss, metrics): a scalar tensor with graph to the UNet's (and the observation encoder's) parameters,
        already multiplied by γ, and the regulariser's floats ``loss_c`` (unweighted), ``lambda_max_mean``,
        ``lambda_max_max`` (λ_max of the normalised sampling-drift Jacobian, :mod:`cdp.contraction`),
        ``frac_contractive``.
    Raises:
        TypeError: not a LeRobot diffusion policy.
        ValueError: no ``action`` in the batch, actions not (B, horizon, action_dim), ``global_cond`` of another
            batch size, or a regulariser whose prediction type or schedule differ from the policy's (build it
            with :func:`lerobot_regularizer`).
    """
    model = diffusion_model_of(policy)
    pred = lerobot_prediction(model)
    if regularizer.config.prediction != pred:
        raise ValueError(f"the regulariser is for prediction {regularizer.config.prediction!r} but the LeRobot policy "
                         f"predicts {pred!r}; build it with lerobot_regularizer(policy)")
    ours = regularizer.schedule.alphas_cumprod
    theirs = torch.as_tensor(model.noise_scheduler.alphas_cumprod).detach().cpu().to(torch.float64)
    if ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=1e-6, atol=1e-9):
        raise ValueError(f"the regulariser's schedule ({regularizer.schedule}) is not the LeRobot policy's noise "
                         f"schedule ({type(model.noise_scheduler).__name__}, {theirs.numel()} steps); build it with "
                         "lerobot_regularizer(policy)")
    if ACTION not in batch:
        raise ValueError(f"the batch has no {ACTION!r} (the clean action chunks); keys: {sorted(batch)}")
    actions = batch[ACTION]
    if actions.dim() != 3:
        raise ValueError(f"batch[{ACTION!r}] must be (B, horizon, action_dim), got shape {tuple(actions.shape)}")
    cond = lerobot_global_cond(model, batch) if global_cond is None else global_cond
    if cond.shape[0] != actions.shape[0]:
        raise ValueError(f"global_cond has batch size {cond.shape[0]}, the actions {actions.shape[0]}")
    with torch.autocast(device_type=actions.device.type, enabled=False):
        return regularizer.loss_from_clean(lerobot_denoiser(model), actions.float(), cond.float(), generator)
