"""The base experiment configuration that every file under `configs/` starts from.

Sections: `data`, `model`, `diffusion`, `training`, `optim`, `eval`, `sampling`. The
defaults are the paper's CIFAR10 hyperparameters (Ho et al. 2020, Appendix B and the
official code). Experiment files override what differs, and any field can be overridden
on the command line (`--config.training.batch_size=64`).

`shrink(config)` turns any configuration into a tiny one for smoke runs and tests; the
experiment files expose it as the `smoke` variant: `--config configs/cifar10.py:smoke`.
"""

from __future__ import annotations

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  """Returns the base configuration (the paper's CIFAR10 setup)."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  # --- Data -------------------------------------------------------------------
  data = config.data = ml_collections.ConfigDict()
  # One of: cifar10, mnist, celeb_a_hq, lsun/church_outdoor, lsun/bedroom, lsun/cat
  # (tensorflow-datasets), digits (scikit-learn's bundled 8x8 digits), npz (a file of
  # uint8 images), folder (a directory of image files).
  data.dataset = "cifar10"
  data.image_size = 32
  data.channels = 3
  data.random_flip = True
  data.path = ""  # For npz (file) and folder (directory) sources.
  data.npz_key = ""  # Array name inside an .npz file; "" picks x_train, x or the only one.
  # Labels (class-conditional runs) inside an .npz file; "" picks y_train or y.
  data.npz_label_key = ""
  data.tfds_data_dir = ""  # "" means the tensorflow-datasets default.
  data.train_split = "train"
  data.eval_split = "test"
  # Fixed-size sources (cifar10, mnist, npz, celeb_a_hq) whose size differs from
  # image_size: False raises an error, True center-crops and resizes them. LSUN, folders
  # and the digits are always cropped/resized.
  data.resize = False
  # Folder sources: leave out image files that cannot be decoded (with a warning that
  # counts them) instead of stopping with an error that names them.
  data.skip_bad_images = False

  # --- Model (the official U-Net) ----------------------------------------------
  model = config.model = ml_collections.ConfigDict()
  model.ch = 128
  model.ch_mult = (1, 2, 2, 2)
  model.num_res_blocks = 2
  model.attn_resolutions = (16,)
  model.dropout = 0.1
  model.resamp_with_conv = True
  model.num_groups = 32
  model.dtype = "float32"  # Compute dtype: float32 or bfloat16 (params stay float32).
  # Recompute each res/attention block in the backward pass: less activation memory for
  # about a third more compute per step (the 256x256 networks on 16 GB devices).
  model.remat = False
  # Kernel policy (`diffusion_jax.ops`): "xla" (pure JAX: the reference, and what runs on
  # TPU and GPU), "native" (the CPU backend's compiled kernels), or "auto" (native on a
  # CPU where they build, else xla). Changes neither the parameters nor the checkpoints.
  model.kernels = "auto"
  # Class conditioning: 0 = unconditional (the paper's network); N > 0 adds a class
  # embedding of N + 1 rows (the last: the null class of classifier-free guidance).
  model.num_classes = 0

  # --- CPU backend (used when model.kernels resolves to native) -------------------
  cpu = config.cpu = ml_collections.ConfigDict()
  # The 3x3 stride-1 convolutions by Winograd's F(2x2, 3x3) where it pays (False: oneDNN's
  # direct convolutions for all).
  cpu.winograd = True
  # XLA:CPU compiler options that keep convolutions out of YNNPACK (faster here).
  cpu.compiler_options = True
  # glibc's malloc set to reuse freed host memory between steps (set before JAX starts;
  # CPU hosts only).
  cpu.reuse_host_memory = True

  # --- Diffusion process --------------------------------------------------------
  diffusion = config.diffusion = ml_collections.ConfigDict()
  diffusion.num_timesteps = 1000
  diffusion.beta_schedule = "linear"  # linear, quad, const, jsd, warmup10, warmup50, cosine
  diffusion.beta_start = 1e-4
  diffusion.beta_end = 0.02
  diffusion.model_mean_type = "eps"  # eps, x_start, v, mean (mu-tilde / x_{t-1})
  diffusion.model_var_type = "fixedlarge"  # fixedlarge, fixedsmall, learned, learned_range
  diffusion.loss_type = "mse"  # mse (L_simple), kl (true bound), rescaled_mse, hybrid
  diffusion.hybrid_lambda = 0.001

  # --- Training -------------------------------------------------------------------
  training = config.training = ml_collections.ConfigDict()
  training.batch_size = 128  # Global batch over all devices and processes.
  training.num_train_steps = 800_000
  training.log_every_steps = 100
  training.checkpoint_every_steps = 5_000  # Preemption checkpoints (latest only).
  training.checkpoint_every_minutes = 10.0
  training.snapshot_every_steps = 100_000  # Kept snapshots.
  training.sample_every_steps = 20_000  # Sample grids from the EMA parameters.
  training.num_sample_images = 64
  training.max_to_keep_preemption = 2
  # Class-conditional networks: the probability of training on the null class instead of
  # the example's label (classifier-free guidance; Ho and Salimans use 0.1 to 0.2).
  training.label_dropout = 0.0
  # FID during training (0 = off): every fid_every_steps steps, fid_num_samples samples of
  # the EMA parameters (the same indices each time) from a fast sampler, FID/KID against
  # reference statistics computed once and cached in the workdir (eval.inception_weights
  # and eval.fid_references as the FID job), logged to TensorBoard as fid/* and kid/*.
  training.fid_every_steps = 0
  training.fid_num_samples = 1_000
  training.fid_sampler = "dpmpp_2m"
  training.fid_num_steps = 20

  # --- Optimizer ------------------------------------------------------------------
  optim = config.optim = ml_collections.ConfigDict()
  optim.learning_rate = 2e-4
  optim.warmup_steps = 5_000
  optim.grad_clip_norm = 1.0
  optim.beta1 = 0.9
  optim.beta2 = 0.999
  optim.eps = 1e-8
  optim.ema_decay = 0.9999
  # Drop the initialization's share decay^step from the EMA (training/train_state.py):
  # for short runs; the official code (and so the paper's configs) does not.
  optim.ema_debias = False

  # --- Sampling -------------------------------------------------------------------
  sampling = config.sampling = ml_collections.ConfigDict()
  # ancestral (all T steps), respaced (ancestral over num_steps of them), ddim,
  # dpmpp_2m, dpmpp_3m, dpmpp_2s, dpmpp_3s (DPM-Solver++, data prediction, multistep or
  # singlestep), dpm_2m, dpm_3m, dpm_2s, dpm_3s (DPM-Solver, noise prediction),
  # dpmpp_2m_sde (SDE-DPM-Solver++(2M)), euler, heun (Karras et al.); see
  # diffusion_jax/sampling.py.
  sampling.sampler = "ancestral"
  sampling.num_steps = 1000  # Steps of the grid (every sampler but ancestral).
  # Timestep grid (diffusion/timesteps.py): uniform, even, quad, leading, linspace,
  # trailing, time_quadratic, logsnr, dpm_fast, karras; "" = the sampler's default (ddim:
  # uniform, respaced: even, DPM-Solvers: logsnr, euler/heun: karras).
  sampling.spacing = ""
  sampling.final_step = "zero"  # zero (end noise-free) or t0 (end at timestep 0's level)
  sampling.denoise_to_zero = False  # With t0: one more network call returns its x_0.
  sampling.eta = 0.0  # DDIM eta (1.0 reproduces ancestral sampling with fixedsmall).
  sampling.clip_denoised = True  # Clip the predicted x_0 to [-1, 1].
  # DDIM: re-derive eps from the clipped x_0 (diffusers' use_clipped_model_output); with
  # eta = 1 this is the paper's ancestral step (fixedsmall) over the subsequence.
  sampling.eps_from_clipped_x0 = False
  # Dynamic thresholding of the predicted x_0 (Imagen): its quantile (0 = off; e.g.
  # 0.995) and the largest threshold; every sampler but ddim.
  sampling.threshold_ratio = 0.0
  sampling.threshold_max = 1.0
  sampling.solver_type = "midpoint"  # DPM-Solver: midpoint, heun (Taylor) or lu (Lu's code)
  sampling.lower_order_final = True  # DPM-Solver: lower orders at the end (< 15 steps)
  # euler/heun stochastic churn (Karras et al. Algorithm 2): S_churn, S_tmin, S_tmax,
  # S_noise (levels in Karras units sigma / alpha); karras_rho: the karras grid's rho.
  sampling.churn = 0.0
  sampling.churn_tmin = 0.0
  sampling.churn_tmax = float("inf")
  sampling.churn_noise = 1.0
  sampling.karras_rho = 7.0
  # DDIM inversion (--mode=invert): the first invert_num_images images of
  # invert_source ("" = data.eval_split, or path.npz[:key]), encoded by DDIM over the
  # grid of num_steps and spacing (ddim's), each step refined by
  # invert_fixed_point_iterations more network calls, then decoded.
  sampling.invert_source = ""
  sampling.invert_num_images = 64
  sampling.invert_fixed_point_iterations = 2
  # Class-conditional networks (model.num_classes > 0): the label of sample i
  # ("balanced": i mod num_classes; "3"; or "0,1,7" in turn) and the classifier-free
  # guidance scale (0: unconditional, 1: conditional, > 1: guided).
  # Reverse variances of ancestral / respaced: "model" (diffusion.model_var_type) or
  # "analytic" (Analytic-DPM from Gamma_t: run --mode=eval_analytic first).
  sampling.variance = "model"
  sampling.labels = "balanced"
  sampling.guidance_scale = 1.0
  sampling.num_samples = 50_000
  sampling.batch_size = 256  # Global batch for sampling jobs.
  sampling.shard_size = 1_000  # Images per written shard.

  # --- Inpainting (--mode=inpaint: RePaint with any trained model) -----------------
  inpaint = config.inpaint = ml_collections.ConfigDict()
  inpaint.images = ""  # path.npz[:key] or a folder; "" = the first images of data.eval_split
  # 1 = known: left_half, right_half, top_half, bottom_half, center, channels:1,0,0, or
  # path.npz[:key] / a folder of mask images (white = known).
  inpaint.mask = "left_half"
  inpaint.num_images = 16
  inpaint.num_completions = 4
  inpaint.jump_length = 10  # RePaint's resampling: j steps back up ...
  inpaint.jump_n_sample = 10  # ... r times per block of j steps (1: no resampling)
  inpaint.batch_size = 16

  # --- Evaluation -----------------------------------------------------------------
  eval_config = config.eval = ml_collections.ConfigDict()
  eval_config.use_ema = True
  eval_config.checkpoint_step = -1  # -1: the latest.
  eval_config.bpd_split = "test"
  eval_config.bpd_batch_size = 64
  eval_config.bpd_num_images = -1  # -1: the whole split.
  eval_config.fid_reference = ""  # .npz with mu/sigma, or "" to compute from data.train_split.
  eval_config.inception_weights = ""  # Converted Inception weights (.npz).
  eval_config.fid_batch_size = 200
  eval_config.fid_method = "sqrtm"  # sqrtm (TTUR's scipy.linalg.sqrtm) or eigh (faster).
  eval_config.bpd_clip_denoised = True  # Clip predicted x_0 in the bound, as the official code.
  eval_config.bpd_t_chunk = 1  # Timesteps evaluated per network call in the bound.
  eval_config.figure_rows = 4
  eval_config.figure_columns = 8
  eval_config.figure_t_fractions = (1.0, 0.75, 0.5, 0.25)  # Of T: where x_t is shared.
  eval_config.figure_num_images = 64
  # Analytic-DPM (`--mode=eval_analytic`): Gamma_t = E ||eps_theta(x_t, t)||^2 / d over the
  # first analytic_num_images images of analytic_split (train: the paper's practice).
  eval_config.analytic_split = "train"
  eval_config.analytic_num_images = 1000
  eval_config.analytic_batch_size = 64
  eval_config.analytic_t_chunk = 1
  # Bits/dim job extras: the bound with Analytic-DPM variances (needs eval_analytic) for
  # T and for every K-step chain of bpd_chain_steps (each also with the chain's
  # fixedsmall/fixedlarge variances), and the probability-flow ODE bits/dim.
  eval_config.bpd_analytic = False
  eval_config.bpd_chain_steps = ()  # e.g. (10, 25, 50, 100)
  eval_config.bpd_ode = False
  eval_config.ode_trace = "rademacher"  # rademacher, gaussian (Hutchinson) or exact
  eval_config.ode_num_probes = 1  # Hutchinson probes per image
  eval_config.ode_solver = "dopri5"  # dopri5 (score_sde's RK45) or tsit5
  eval_config.ode_rtol = 1e-5
  eval_config.ode_atol = 1e-5
  eval_config.ode_t_min = 1e-5
  eval_config.ode_max_steps = 4096
  # FID job: references of the roles in fid_references ("train": fid_reference or
  # data.train_split; "test": fid_test_reference or data.eval_split), computed once from
  # the first fid_reference_num_images images (-1: all) and cached under eval/ with
  # their features (for KID and precision/recall).
  eval_config.fid_references = ("train", "test")
  eval_config.fid_test_reference = ""
  eval_config.fid_reference_num_images = -1
  eval_config.kid_subsets = 100
  eval_config.kid_subset_size = 1000
  eval_config.pr_num_images = 10_000  # precision/recall (k = 3) on at most this many
  return config


def shrink(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Returns a copy of `config` small enough for a smoke run on a CPU in seconds."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.ch = 32
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (config.data.image_size // 2,)
  config.model.num_groups = 8
  config.diffusion.num_timesteps = 100
  config.training.batch_size = 16
  config.training.num_train_steps = 10
  config.training.log_every_steps = 5
  config.training.checkpoint_every_steps = 5
  config.training.snapshot_every_steps = 10
  config.training.sample_every_steps = 10
  config.training.num_sample_images = 4
  config.optim.warmup_steps = 5
  config.sampling.num_samples = 16
  config.sampling.batch_size = 8
  config.sampling.shard_size = 8
  config.eval.bpd_batch_size = 8
  config.eval.bpd_num_images = 16
  config.eval.fid_batch_size = 8
  return config


def finalize(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """Applies a variant named after the config path (`file.py:variant`) and returns it.

  Args:
    config: the experiment's configuration.
    variant: "" for the full run or "smoke" for a tiny one.

  Raises:
    ValueError: for an unknown variant.
  """
  if variant in ("", None):
    return config
  if variant == "smoke":
    return shrink(config)
  raise ValueError(f"Unknown config variant {variant!r}; use '' or 'smoke'.")
