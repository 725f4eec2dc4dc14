"""Evaluation: the TF FID Inception in Flax, FID / IS / precision-recall, and the jobs.

Metrics: `inception` (network), `inception_weights` (conversion mapping, .npz I/O),
`resize` (TF1 legacy bilinear resize and (x - 128) / 128), `features` (sharded batched
feature extraction), `fid` (statistics and Fréchet distance), `inception_score`,
`precision_recall`, `image_sources` (image sets from .npz files, folders, sample sets).

Jobs (`modes.MODES`, run by `python -m diffusion_jax.main --mode=...`): `bpd_job`
(bits/dim, Table 4, Fig. 5), `sample_job` (resumable sample shards), `fid_job`,
`figures`; with `restore` (the checkpoint's parameters) and `results` (files, manifests,
JSON summaries, clu writers).
"""
