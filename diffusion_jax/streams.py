"""The table of random streams: every key of a run derives from `jax.random.key(seed)`.

Run-level streams (`stream_key(seed, stream)` = fold_in(key(seed), stream)), each then
folded with a step or an example index where that applies:
  INIT      the parameters' initialization.
  TRAIN     the training steps (then the step; see `training.train_step`).
  BPD       the bits/dim job's noise (then the image index in the split).
  SAMPLE    samples (then the sample index): the sampling and FID jobs' sample sets and
            the training run's sample grids, so a grid shows samples 0..N-1 of the set.
  FIGURE    the figures job (then the figure row).
  INPAINT   the inpainting job (then the image index, then the completion index).
  ANALYTIC  the Analytic-DPM job's noise (then the image index in its split).
  ODE       the ODE likelihood (then the image index): fold_in(., 0) the dequantization
            noise u, fold_in(., 1) the Hutchinson probes.
  KID       the KID subsets: NumPy's default_rng([seed, KID]) (see evaluation.kid).

Per-example streams past T: within a sampler, example b's key `keys[b]` is folded with the
timestep t in [0, T) for the noise of step t and with T for x_T (see
`diffusion.randomness`); other uses take indices past T:
  COMPLETION  fold_in(keys[b], T + COMPLETION): the keys of the completions of example b.
  ENCODER     fold_in(keys[b], T + ENCODER): the encoder noise of interpolation.
  REPAINT     fold_in(keys[b], T + REPAINT): the moves of RePaint inpainting.
"""

from __future__ import annotations

import jax

INIT = 0
TRAIN = 1
BPD = 10
SAMPLE = 11
FIGURE = 12
ANALYTIC = 13
ODE = 14
KID = 15
INPAINT = 16

COMPLETION = 1
ENCODER = 2
REPAINT = 3


def stream_key(seed: int, stream: int) -> jax.Array:
  """Returns `fold_in(jax.random.key(seed), stream)`."""
  return jax.random.fold_in(jax.random.key(int(seed)), stream)
