"""The trainer: the training loop and its step, the optimizer, checkpoints, the workdir claim,
metrics, the command-line layer, the evaluator and the TPU compile command."""
