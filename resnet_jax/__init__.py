"""resnet_jax: "Deep Residual Learning for Image Recognition" (He et al., 2015) in JAX/Flax.

`import resnet_jax.models` pulls in jax and flax only; data pipelines (TensorFlow
Datasets) live in `resnet_jax.data` and load only when imported.
"""

__version__ = "0.6.0"  # setup.py, CHANGELOG.md
