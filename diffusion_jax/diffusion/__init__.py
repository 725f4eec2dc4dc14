"""The diffusion math as pure functions of arrays: noise schedules (`schedules`), the
Gaussian process and its parameterizations (`process`), training losses (`losses`), the
variational bound (`bound`), the samplers (`samplers`) and per-example randomness
(`randomness`)."""
