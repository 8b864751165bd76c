"""har_jax: HAR / ELF early-exit training for long-tailed classification in JAX."""

import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent
# One range for JAX and its accelerator builds, so that [cuda] and [tpu] pull
# the JAX the library was tested with.
_JAX = ">=0.5.0,<0.11"
# [train]: the trainer (har_jax.main, har_jax.train) and its data.
_TRAIN = [
    # Checkpoints (Flax requires orbax-checkpoint too; the trainer pins it).
    "orbax-checkpoint>=0.11.0,<0.13",
    # Configs, metrics' TensorBoard logs, data.
    "ml_collections>=1.0.0",
    "clu>=0.0.12",
    "absl-py>=2.1",
    "tensorflow-datasets>=4.9.7,<5",
    # Imported by tfds's preparation code but not declared by tfds (4.9.10
    # requires them only on Python < 3.9, or in its extras):
    # importlib_resources by every builder's download_and_prepare (without
    # it no data set prepares), bs4 by its Google Drive download (the
    # confirmation page, on ImageNet-LT's split lists).
    "importlib-resources>=5",
    "beautifulsoup4>=4.9",
    # clu's TensorBoard writer and tfds preparation need TensorFlow; the CPU
    # build avoids pulling CUDA libraries that JAX brings by itself.
    "tensorflow-cpu>=2.18,<2.22",
    "tensorboard>=2.18",
    # The offline default data set (handwritten digits shipped in the wheel).
    "scikit-learn>=1.3",
    # The plots of experiments/analyze.py.
    "matplotlib>=3.8",
    # experiments/digits_folder.py writes PNG files with it, and the image-folder
    # tests write their generated folder (matplotlib brings it too).
    "pillow>=10",
]

setuptools.setup(
    name="har_jax",
    version="0.1.0",
    description=("Hardness-aware re-weighting with early exits (HAR / ELF) for "
                 "long-tailed image classification in JAX and Flax."),
    long_description=(_HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=setuptools.find_packages(include=["har_jax", "har_jax.*"]),
    # The CPU convolution kernels' source, compiled on first use (har_jax/cpu_conv.py).
    package_data={"har_jax": ["csrc/*.cc"]},
    python_requires=">=3.11",
    # The library: losses, models, mixing, early exits, and the train step that
    # experiments/gpu_benchmark.py times. (Flax brings orbax-checkpoint and
    # tensorstore with it, JAX scipy, optax absl-py.)
    install_requires=[
        "jax" + _JAX,
        "flax>=0.10.2,<0.13",
        "optax>=0.2.4,<0.3",
        "numpy>=1.26",
    ],
    extras_require={
        "train": _TRAIN,
        # Everything the test suite imports: the trainer and pytest; pytest-xdist
        # runs the suite's files on two processes (README's test command).
        "test": [*_TRAIN, "pytest>=8", "pytest-xdist>=3"],
        # JAX's accelerator builds: NVIDIA GPUs (CUDA 12 wheels, driver >= 525), TPU VMs.
        "cuda": ["jax[cuda12]" + _JAX],
        "tpu": ["jax[tpu]" + _JAX],
        # experiments/compare_torch.py: the PyTorch reference step (CPU build).
        "torch": ["torch==2.13.0"],
    },
)
