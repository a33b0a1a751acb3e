"""fastmem: high-throughput training on random labels with layer-wise k-NN probes."""

from setuptools import setup

PACKAGES = [
    "fastmem", "fastmem.data", "fastmem.models", "fastmem.run", "fastmem.train", "fastmem.probe", "fastmem.probe.metrics",
    "fastmem.experiments",
    "fastmem.experiments.cluster", "fastmem.report", "fastmem.pipelines", "fastmem.pipelines.executors",
    "fastmem.pipelines.backends", "fastmem.kernels",
]

setup(
    name="fastmem",
    version="0.1.0",
    description="High-throughput trainer for memorization research: random labels, augmentation, k-NN probes",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # pipelines/ and kernels/ ship as fastmem.pipelines and fastmem.kernels: the bare names are taken on PyPI.
    packages=PACKAGES,
    package_dir={"fastmem": "fastmem", "fastmem.pipelines": "pipelines", "fastmem.kernels": "kernels"},
    package_data={"fastmem.kernels": ["*.cu"]},
    install_requires=["torch>=2.4", "torchvision>=0.19", "numpy>=1.24", "numba>=0.60", "pillow", "tqdm", "matplotlib"],
    extras_require={
        # Pinned to the releases tested (scripts/bootstrap.sh installs these). DALI's CUDA 12 build
        # also runs CPU-only; FFCV builds from source against pkg-config's opencv4 and libturbojpeg
        # and imports PIL without declaring it.
        "dali": ["nvidia-dali-cuda120==2.4.0"],
        "ffcv": ["ffcv==1.0.2", "numba>=0.60", "pillow"],
        "cuda12": ["cupy-cuda12x"],
        "cuda13": ["cupy-cuda13x"],
        "trt": ["torch-tensorrt"],
        "tensorboard": ["tensorboard"],
        # `python -m fastmem.experiments run --executor slurm|local` (submits through submitit).
        "cluster": ["submitit>=1.5"],
        "dev": ["pytest", "pytest-timeout", "pytest-xdist", "hypothesis", "ruff", "scikit-learn", "faiss-cpu", "tensorboard",
                "submitit>=1.5"],
    },
    entry_points={"console_scripts": ["fastmem-train=fastmem.train:cli", "fastmem-demo=fastmem.demo:cli",
                                      "fastmem-experiments=fastmem.experiments.__main__:cli", "fastmem-report=fastmem.report:cli"]},
)
