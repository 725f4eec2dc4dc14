"""Evaluation: the TF FID Inception in Flax, its preprocessing, FID / IS / precision-recall.

Modules: `inception` (network), `inception_weights` (conversion mapping, .npz I/O),
`resize` (TF1 legacy bilinear resize and (x - 128) / 128), `features` (sharded batched
feature extraction), `fid` (statistics and Fréchet distance), `inception_score`,
`precision_recall`, `image_sources` (image sets from .npz files and folders).
"""
