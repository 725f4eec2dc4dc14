"""CIFAR10 32x32, the paper's setup (35.7M-parameter U-Net, L_simple, eps-prediction).

  python -m diffusion_jax.main --config configs/cifar10.py --workdir workdirs/cifar10

800k steps at batch 128, Adam 2e-4 with 5000 warmup steps, EMA 0.9999, dropout 0.1,
random horizontal flips, T = 1000 linear betas 1e-4..0.02 (Ho et al. 2020, Appendix B).

The rows of the paper's Table 2 (objective ablation, IS / FID) are overrides of this file
(`TABLE2_ROWS` lists them); e.g. the true bound with learned variances:
  --config.diffusion.model_mean_type=mean --config.diffusion.model_var_type=learned \
  --config.diffusion.loss_type=kl
"""

from diffusion_jax import config_base

_D = "--config.diffusion."
# Table 2 row -> (command-line overrides, the paper's IS / FID or "unstable").
TABLE2_ROWS = {
    "mu~ prediction, L, learned diagonal Sigma": (
        (_D + "model_mean_type=mean", _D + "model_var_type=learned", _D + "loss_type=kl"),
        "7.28 / 23.69"),
    "mu~ prediction, L, fixed isotropic Sigma": (
        (_D + "model_mean_type=mean", _D + "model_var_type=fixedlarge", _D + "loss_type=kl"),
        "8.06 / 13.22"),
    "mu~ prediction, ||mu~ - mu~_theta||^2": (
        (_D + "model_mean_type=mean", _D + "model_var_type=fixedlarge", _D + "loss_type=mse"),
        "unstable"),
    "eps prediction, L, learned diagonal Sigma": (
        (_D + "model_mean_type=eps", _D + "model_var_type=learned", _D + "loss_type=kl"),
        "unstable"),
    "eps prediction, L, fixed isotropic Sigma": (
        (_D + "model_mean_type=eps", _D + "model_var_type=fixedlarge", _D + "loss_type=kl"),
        "7.67 / 13.51"),
    "eps prediction, ||eps~ - eps||^2 (L_simple)": (
        (_D + "model_mean_type=eps", _D + "model_var_type=fixedlarge", _D + "loss_type=mse"),
        "9.46 / 3.17"),
}


def get_config(variant: str = ""):
  config = config_base.get_base_config()
  return config_base.finalize(config, variant)
