"""MNIST 28x28, one channel (seed 004's exercise): eps- or v-prediction.

  --config.diffusion.model_mean_type=v   for v-prediction.

Variants (`configs/mnist.py:VARIANT`):
  smoke  a tiny model for tests.
  cpu    a smaller U-Net (ch 32, one res block per level, 1.11M parameters) at 0.6-0.8
         steps/s on a 2-core CPU (its 4,000 steps: about 1.5 hours; the README's MNIST
         demonstration evaluates step 4,000). It reads the official MNIST files from
         an .npz (--config.data.path=mnist.npz with x_train/x_test; the default path is
         the shared data folder beside the checkout, run from the repository root).
  cond   the cpu variant, class-conditional (the ten digits, labels from the .npz's
         y_train) with label dropout 0.1 for classifier-free guidance.
"""

from diffusion_jax import config_base


def get_config(variant: str = ""):
  config = config_base.get_base_config()
  config.data.dataset = "mnist"
  config.data.image_size = 28
  config.data.channels = 1
  config.data.random_flip = False
  config.model.ch = 64
  config.model.ch_mult = (1, 2, 2)
  config.model.attn_resolutions = (14,)
  config.model.dropout = 0.1
  config.training.batch_size = 128
  config.training.num_train_steps = 50_000
  config.training.sample_every_steps = 5_000
  config.training.snapshot_every_steps = 10_000
  config.optim.warmup_steps = 1_000
  if variant in ("cpu", "cond"):
    config.data.dataset = "npz"
    config.data.path = "../shared/data/mnist.npz"
    config.model.ch = 32
    config.model.num_res_blocks = 1
    config.model.dropout = 0.0
    config.training.batch_size = 64
    config.training.num_train_steps = 4_000
    config.training.log_every_steps = 50
    config.training.checkpoint_every_steps = 500
    config.training.snapshot_every_steps = 4_000
    config.training.sample_every_steps = 4_000
    config.optim.learning_rate = 5e-4
    config.optim.warmup_steps = 200
    config.optim.ema_decay = 0.999
    config.optim.ema_debias = True  # 0.999^4000 = 1.8% of the initialization otherwise
    config.sampling.batch_size = 250
    config.eval.bpd_batch_size = 50
    if variant == "cond":
      config.model.num_classes = 10
      config.training.label_dropout = 0.1
    return config
  return config_base.finalize(config, variant)
