from setuptools import setup

setup(
    name="fastdpo",
    version="0.1.0",
    description="Fused, memory-lean Direct Preference Optimization losses for language models",
    python_requires=">=3.10",
    # kernels/ ships inside the fastdpo namespace: a PyPI package is already called `kernels`.
    packages=["fastdpo", "fastdpo.kernels"],
    package_dir={"fastdpo": "fastdpo", "fastdpo.kernels": "kernels"},
    install_requires=["torch>=2.4", "triton>=3.0", "transformers>=4.45", "safetensors>=0.4"],
    extras_require={
        # deepspeed: a 2 MB source package of pure-Python dependencies (~20 s to install on CPU, builds no op)
        "test": ["pytest>=7", "numpy", "matplotlib", "hypothesis", "trl==1.16.0", "peft", "accelerate", "datasets",
                 "deepspeed"],
        "trl": ["trl==1.16.0"],  # fastdpo.trl: the DPOTrainer drop-in
        "deepspeed": ["deepspeed", "accelerate"],  # ZeRO-2/3 through accelerate launch (fastdpo.distributed)
        "bench": ["matplotlib", "numpy"],
        # peers that benchmarks/run.py compares against (pinned: versions whose CPU paths were measured)
        "peers": ["trl==1.16.0", "liger-kernel==0.8.5"],
        "gpu": ["flash-attn"],
    },
)
