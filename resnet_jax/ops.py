"""Convolution used by every model layer (work in progress: experiment switch)."""
import sys
sys.path.insert(0, "/tmp/perf")
from ops_exp import conv_general_dilated
