"""One ml_collections config per experiment of the paper; `common`, `cifar_base` and
`imagenet_base` hold the recipes, every other file states only what differs."""
