"""resnet_jax: Deep Residual Learning (He et al., 2015) in JAX/Flax."""
import importlib.metadata
import importlib.util
import os
import platform
import sys

import setuptools

# Versions that install and pass the whole test suite together (.ci/run runs both ends):
#   Python 3.11: jax 0.10.2 (the newest for 3.11), flax 0.12.8.
#   Python 3.12 and 3.13: jax 0.12.0.1, flax 0.12.12; jax 0.11.2 (the GPU images) as well.
# `pip install resnet_jax`: the models alone (resnet_jax.models, ops, linen, pretrained, analysis).
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.13",
    "flax>=0.12.8,<0.13",
    "numpy>=1.26",
    "etils[epath]>=1.7",
]
# `pip install "resnet_jax[train]"`: the trainer, its data pipelines and the report.
TRAIN_REQUIRES = [
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "ml_collections>=1.1.0,<2",
    "absl-py>=2.1",
    "tensorboardX>=2.6",
    "matplotlib>=3.8",  # resnet_jax.tools.report's figures.
    # tensorflow-cpu has no wheel for Linux aarch64 (GH200 and GB200 hosts): there, tensorflow's
    # own (resnet_jax.data.sources hides the GPUs from TensorFlow either way).
    "tensorflow-cpu>=2.21.0,<2.22; platform_machine != 'aarch64'",
    "tensorflow>=2.21.0,<2.22; platform_machine == 'aarch64'",
    "tensorflow-datasets>=4.9.10,<5",
    # TFDS's dataset builders (resnet_jax.tools.prepare) import it; TFDS does not declare it.
    "importlib_resources>=6",
    "requests>=2.31",  # resnet_jax.tools.prepare checks the network with it, as TFDS downloads.
    # oneDNN's library, which resnet_jax.models._onednn calls (pyproject.toml builds it against
    # the headers of this version): the CPU trainer's weight gradients.
    "onednn-cpu-gomp==2023.2.0; sys_platform == 'linux' and platform_machine == 'x86_64'",
]
# grain: the input-pipeline benchmark's comparison (resnet_jax.tools.input_benchmark).
# torch: the baseline of resnet_jax.tools.benchmark, and the PyTorch twins that torchvision weights and
# pre-activation nets are tested against (tests/test_torchvision.py, tests/test_preactivation.py);
# its 2.13.0 CPU wheel is for Python 3.11, so those tests run in CI's Python 3.11 suite and skip
# elsewhere, where you install the torch you want.
TORCH = "torch==2.13.0; python_version < '3.12'"
EXTRAS_REQUIRE = {
    "train": TRAIN_REQUIRES,
    # keras: tests/test_pretrained.py's reference models (it comes with tensorflow).
    "test": [*TRAIN_REQUIRES, "pytest>=8", "pytest-xdist>=3.5", "pytest-timeout>=2.3",
             "grain>=0.2.18", "keras>=3", "pillow>=10", "packaging>=23", TORCH],
    # PyTorch is only ever the benchmark's baseline, never a dependency of the package.
    "benchmark": [*TRAIN_REQUIRES, "grain>=0.2.18", TORCH],
    "tpu": ["jax[tpu]>=0.10.2,<0.13"],
    "cuda13": ["jax[cuda13]>=0.10.2,<0.13"],
}



def onednn_extension() -> list[setuptools.Extension]:
  """resnet_jax.models._onednn (resnet_jax/models/onednn_convolution.cc) where the build has
  jaxlib's XLA FFI headers and oneDNN's (pyproject.toml's build requirements), else none: it is
  optional, and without it the CPU trainer computes its weight gradients with XLA."""
  jaxlib = importlib.util.find_spec("jaxlib")
  try:
    onednn = {str(file): file.locate().resolve()
              for distribution in ("onednn-devel-cpu-gomp", "onednn-cpu-gomp")
              for file in importlib.metadata.files(distribution) or ()}
  except importlib.metadata.PackageNotFoundError:
    return []
  header = next((path for name, path in onednn.items() if name.endswith("oneapi/dnnl/dnnl.hpp")),
                None)
  library = next((path for name, path in onednn.items() if name.endswith("/libdnnl.so")), None)
  if (sys.platform != "linux" or platform.machine() != "x86_64" or jaxlib is None
      or header is None or library is None):
    return []
  return [setuptools.Extension(
      "resnet_jax.models._onednn", ["resnet_jax/models/onednn_convolution.cc"],
      # jaxlib's include/ holds xla/ffi/api/ffi.h; oneDNN's, oneapi/dnnl/dnnl.hpp.
      include_dirs=[os.path.join(jaxlib.submodule_search_locations[0], "include"),
                    str(header.parents[2])],
      library_dirs=[str(library.parent)], libraries=["dnnl"],
      extra_compile_args=["-std=c++17", "-O2"], language="c++", optional=True)]


setuptools.setup(
    name="resnet_jax",
    version="0.6.0",  # CHANGELOG.md
    description="Deep Residual Learning for Image Recognition, reproduced in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    # The repository's configs/ installs as resnet_jax.configs (`--config=cifar_resnet110`).
    packages=[*setuptools.find_packages(include=["resnet_jax", "resnet_jax.*"]),
              "resnet_jax.configs"],
    package_dir={"resnet_jax.configs": "configs"},
    package_data={"resnet_jax": ["py.typed"]},
    python_requires=">=3.11",
    ext_modules=onednn_extension(),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
