"""megamor: pretraining Mixture-of-Recursions language models on megatron-core."""

from setuptools import find_packages, setup

setup(
    name="megamor",
    version="0.1.0",
    description="Distributed pretraining of Mixture-of-Recursions LMs on megatron-core",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # launch/ and tokenizer/ stay top-level folders of the checkout but install inside the
    # package, as megamor.launch and megamor.tokenizer (no generic top-level names in
    # site-packages); megamor/__init__.py maps them for a checkout that is not installed.
    packages=find_packages(include=["megamor", "megamor.*"]) + ["megamor.launch",
                                                                 "megamor.tokenizer"],
    package_dir={"megamor.launch": "launch", "megamor.tokenizer": "tokenizer"},
    install_requires=[
        # CPU installs pin torch through constraints-cpu.txt (a bare `torch` pulls CUDA wheels).
        "torch>=2.4",
        # 0.16.1 is the newest release for Python 3.11; clusters run 0.19.x on Python 3.12.
        "megatron-core>=0.16.1",
        # megatron's dist_checkpointing needs psutil but does not declare it (saves hang).
        "psutil",
        "numpy",
        "pyyaml",
        "tokenizers>=0.15",
        "webdataset>=0.2.90",
        # webdataset's indexed shard reader (megamor/data/shard_reader.py); webdataset 1.x no
        # longer ships it inside its own wheel.
        "wids>=0.1.11",
        "tqdm",  # `megamor data prepare` progress bar
        # checksums of checkpoint files (megamor/checksums.py): xxh3, ~20 GB/s per core
        "xxhash>=3.0",
        # MLflow tracking (megamor/tracking.py; its default store is SQLite, which needs the full
        # package, not mlflow-skinny) and depth-map PNGs (megamor/depth_map.py).
        "mlflow>=3.0",
        "matplotlib>=3.7",
    ],
    extras_require={
        # GPU path: Transformer Engine (FP8, fused kernels) and flash attention; NVIDIA's fused
        # kernels package is built from source on the cluster, never from PyPI (see README).
        "gpu": ["transformer-engine[pytorch]", "flash-attn"],
        # `megamor convert` / exports (transformers 5 API for the shipped MoR modeling code).
        "hf": ["transformers>=5.0", "safetensors>=0.4"],
        # `megamor eval --tasks`: few-shot accuracy of an export through lm-evaluation-harness
        # (its "hf" model backend imports accelerate).
        "eval": ["lm_eval>=0.4.8", "accelerate>=0.26", "transformers>=5.0", "safetensors>=0.4"],
        # `parallel.engine=deepspeed` (megamor/engines/deepspeed.py): ZeRO-1/2/3, offload.
        "deepspeed": ["deepspeed>=0.19.8"],
        # `megamor data prepare` inputs: .parquet, .zst, `datasets` saved with save_to_disk.
        "data": ["pyarrow>=14", "zstandard>=0.20", "datasets>=2.14"],
        "dev": ["pytest", "pytest-xdist>=3.5", "pyarrow>=14", "zstandard>=0.20", "datasets>=2.14",
                "transformers>=5.0", "safetensors>=0.4", "lm_eval>=0.4.8", "accelerate>=0.26",
                "deepspeed>=0.19.8"],
    },
    entry_points={"console_scripts": ["megamor=megamor.cli:main"]},
)
