"""The PyTorch peers: diffusers' UNet2DModel with our weights, its train step, pipelines.

The network is the same function on both sides: our parameters are exported with
`diffusion_jax.convert` (`diffusers_config_from`, `state_dict_from_params`) into a
`diffusers.UNet2DModel`, whose output matches ours to float32 rounding
(tests/test_unet_parity.py).
"""

from __future__ import annotations

import numpy as np

from diffusion_jax.convert import diffusers_config
from diffusion_jax.convert import diffusers_weights
from diffusion_jax.models import UNetConfig


def torch_unet(params, unet_config: UNetConfig, torch, *, train: bool = False):
  """A diffusers `UNet2DModel` computing our network with `params` (float32, CPU)."""
  import diffusers  # pylint: disable=g-import-not-at-top
  config = diffusers_config.diffusers_config_from(unet_config)
  config = {k: v for k, v in config.items() if not k.startswith("_")}
  model = diffusers.UNet2DModel.from_config(config)
  state_dict = diffusers_weights.state_dict_from_params(params, unet_config)
  model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v))
                         for k, v in state_dict.items()})
  return model.train(train)


def state_bytes(tensors) -> int:
  """Bytes held by a list of torch tensors."""
  return int(sum(t.numel() * t.element_size() for t in tensors))


class TorchTrainStep:
  """The peer's training update, the same work as ours (train_step.make_train_step).

  Per call: per-example timesteps and noise, x_t = q_sample, eps-prediction MSE
  (L_simple), backward, global-norm clipping at 1.0, Adam (eps 1e-8), EMA 0.9999.
  """

  def __init__(self, model, torch, *, num_timesteps: int, alphas_cumprod: np.ndarray,
               learning_rate: float = 2e-4, ema_decay: float = 0.9999, dtype=None):
    self.torch = torch
    self.model = model
    self.params = [p for p in model.parameters() if p.requires_grad]
    self.opt = torch.optim.Adam(self.params, lr=learning_rate, eps=1e-8, foreach=True)
    self.ema = [p.detach().clone() for p in self.params]
    self.ema_decay = ema_decay
    self.num_timesteps = num_timesteps
    abar = torch.from_numpy(np.asarray(alphas_cumprod, np.float64))
    self.sqrt_abar = abar.sqrt().float()
    self.sqrt_one_minus_abar = (1.0 - abar).sqrt().float()
    self.autocast_dtype = dtype  # e.g. torch.bfloat16 for autocast, None for float32.

  def resident_bytes(self) -> int:
    """Parameters, EMA and Adam moments (what stays allocated between steps)."""
    return 4 * state_bytes(self.params)

  def __call__(self, images):  # images [B, C, H, W] float32 in [-1, 1]
    torch = self.torch
    batch = images.shape[0]
    t = torch.randint(0, self.num_timesteps, (batch,))
    noise = torch.randn_like(images)
    x_t = (self.sqrt_abar[t].view(-1, 1, 1, 1) * images +
           self.sqrt_one_minus_abar[t].view(-1, 1, 1, 1) * noise)
    if self.autocast_dtype is not None:
      with torch.autocast(images.device.type, dtype=self.autocast_dtype):
        eps = self.model(x_t, t).sample
    else:
      eps = self.model(x_t, t).sample
    loss = torch.mean((eps.float() - noise) ** 2)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.params, 1.0)
    self.opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(self.ema, self.params, 1.0 - self.ema_decay)  # pylint: disable=protected-access
    return float(loss.detach())


def ddpm_pipeline(model, num_timesteps: int, variance_type: str = "fixed_large"):
  """diffusers' DDPMPipeline with the paper's linear schedule, clipped x_0."""
  import diffusers  # pylint: disable=g-import-not-at-top
  scheduler = diffusers.DDPMScheduler(num_train_timesteps=num_timesteps,
                                      beta_schedule="linear", variance_type=variance_type,
                                      clip_sample=True)
  return diffusers.DDPMPipeline(unet=model, scheduler=scheduler).to("cpu")


def ddim_pipeline(model, num_timesteps: int):
  """diffusers' DDIMPipeline with the paper's linear schedule, clipped x_0."""
  import diffusers  # pylint: disable=g-import-not-at-top
  scheduler = diffusers.DDIMScheduler(num_train_timesteps=num_timesteps,
                                      beta_schedule="linear", clip_sample=True,
                                      set_alpha_to_one=True, timestep_spacing="leading")
  return diffusers.DDIMPipeline(unet=model, scheduler=scheduler).to("cpu")


def run_pipeline(pipeline, torch, batch: int, num_steps: int, seed: int = 0, **kwargs):
  """Runs a pipeline to numpy images (the pipeline's own loop, no progress bar)."""
  pipeline.set_progress_bar_config(disable=True)
  generator = torch.Generator().manual_seed(seed)
  return pipeline(batch_size=batch, generator=generator, num_inference_steps=num_steps,
                  output_type="np", **kwargs).images
