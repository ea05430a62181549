"""PixelFlow in JAX/Flax NNX."""
