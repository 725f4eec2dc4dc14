"""Checkpoint conversion: official TensorFlow DDPM checkpoints and diffusers UNet2DModel
weights into this project's U-Net parameters, and export back to diffusers."""
