# vLLM (CUDA) + vllm-kvcomp. Build: docker build -t vllm-kvcomp .
# Run:   docker run --gpus all -p 8000:8000 vllm-kvcomp MODEL --kv-compression h2o:0.25
FROM vllm/vllm-openai:v0.33.0
WORKDIR /opt/vllm-kvcomp
COPY setup.py README.md ./
COPY vllm_kvcomp ./vllm_kvcomp
COPY triton_kernels ./triton_kernels
COPY configs ./configs
# vLLM and torch come from the base image; only our package is added.
RUN pip install --no-cache-dir --no-deps . && pip install --no-cache-dir "pydantic>=2" pyyaml
ENTRYPOINT ["vllm", "serve"]
