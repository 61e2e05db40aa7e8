"""The paper's experiments as sweeps of training runs (`python -m experiments.sweeps`)."""
