"""The CPU quickstart: scikit-learn's bundled 8x8 digits (1797 images, no download).

  python -m diffusion_jax.main --config configs/digits.py --workdir workdirs/digits

Trains a small U-Net (0.28M parameters) at the digits' native 8x8 resolution for 1500
steps at batch 64: about 3 minutes on a 2-core CPU including compilation (measured with
other jobs on the machine). Writes a sample grid
(workdir/samples/), TensorBoard logs and checkpoints. The diffusion is the paper's
(linear betas 1e-4..0.02, eps-prediction, L_simple, ancestral sampling) with fewer steps
(T = 100), and a faster optimizer schedule (lr 1e-3, EMA 0.995) for the short run.
`benchmarks/digits_quality.py` scores the samples with a classifier of real digits.

Variants: `smoke` (tests), `cond` (class-conditional on the ten digits, label dropout 0.1
for classifier-free guidance).
"""

from diffusion_jax import config_base


def get_config(variant: str = ""):
  config = config_base.get_base_config()
  config.data.dataset = "digits"
  config.data.image_size = 8
  config.data.channels = 1
  config.data.random_flip = False
  config.data.eval_split = "train"  # The digits have a single split.
  config.model.ch = 32
  config.model.ch_mult = (1, 1)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (4,)
  config.model.num_groups = 8
  config.model.dropout = 0.0
  config.diffusion.num_timesteps = 100
  config.training.batch_size = 64
  config.training.num_train_steps = 1_500
  config.training.log_every_steps = 50
  config.training.checkpoint_every_steps = 500
  config.training.snapshot_every_steps = 1_500
  config.training.sample_every_steps = 1_500
  config.training.num_sample_images = 64
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 50
  config.optim.ema_decay = 0.995
  config.sampling.num_steps = 100
  config.sampling.batch_size = 64
  config.eval.bpd_split = "train"
  if variant == "cond":
    config.model.num_classes = 10
    config.training.label_dropout = 0.1
    return config
  config = config_base.finalize(config, variant)
  if variant == "smoke":
    # The training-system tests run this variant, so it is the smallest U-Net that still
    # has attention (one resolution level: no resampling, which the U-Net tests cover),
    # with dropout on so that the tests cover its randomness.
    config.model.ch_mult = (1,)
    config.model.attn_resolutions = (8,)
    config.model.dropout = 0.1
  return config
