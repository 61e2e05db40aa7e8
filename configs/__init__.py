"""One ml_collections config per experiment of the paper; `common`, `cifar_base` and
`imagenet_base` hold the recipes, every other file states only what differs.

The package installs as `resnet_jax.configs`, whose experiments --config takes by name
(`--config=cifar_resnet110`); the configs import each other relatively, so that they load the
same from a checkout's configs/ folder.
"""

# The modules that are not experiments, and so no --config name.
RECIPES = ("common", "cifar_base", "imagenet_base")
