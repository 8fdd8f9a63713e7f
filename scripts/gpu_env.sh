# Source on the lent GPU machine, from the repo root (device tool; carry .gpu):
#     source scripts/gpu_env.sh && python3 benchmarks/gpu_e2e.py --out $OUT/gpu
# The slim vLLM 0.33 bundle (../shared/gpu-vllm) plus this checkout on PYTHONPATH, with the
# package's entry point declared so vLLM loads the plugin ('pip install -e' does not take there).
source .gpu/activate.sh || return 1
ln -sfn ../triton_kernels vllm_kvcomp/triton_kernels  # package_dir of setup.py, by hand
_KV=/tmp/kvcomp_path
mkdir -p "$_KV/vllm_kvcomp-0.1.0.dist-info"
ln -sfn "$PWD/vllm_kvcomp" "$_KV/vllm_kvcomp"
printf 'Metadata-Version: 2.1\nName: vllm-kvcomp\nVersion: 0.1.0\n' > "$_KV/vllm_kvcomp-0.1.0.dist-info/METADATA"
printf '[vllm.general_plugins]\nkvcomp = vllm_kvcomp.plugin:register\n' > "$_KV/vllm_kvcomp-0.1.0.dist-info/entry_points.txt"
export PYTHONPATH="$_KV:$PYTHONPATH"
