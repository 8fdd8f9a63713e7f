"""Triton kernels (installed as ``vllm_kvcomp.triton_kernels``)."""
