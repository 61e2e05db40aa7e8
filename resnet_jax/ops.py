"""Convolution used by every model layer (work in progress: plain lax for now)."""
from jax import lax

conv_general_dilated = lax.conv_general_dilated
