# Sourced on the GPU machine from the repo root (how the H200 figures in docs/benchmarks.md were run): the vLLM
# bundle of ../shared/gpu (carried as .gpu/, see build-vllm-bundle.sh), this checkout as the package (kernels/ and
# offline/ linked in as the install maps them), the plugin's vLLM entry point, and no user tile table.
source .gpu/env.sh
ln -sfn ../kernels vllm_outliertune/kernels
ln -sfn ../offline vllm_outliertune/offline
mkdir -p /tmp/ep/vllm_outliertune-0.1.0.dist-info
printf 'Metadata-Version: 2.1\nName: vllm-outliertune\nVersion: 0.1.0\n' > /tmp/ep/vllm_outliertune-0.1.0.dist-info/METADATA
printf '[vllm.general_plugins]\noutliertune = vllm_outliertune:register\n' \
  > /tmp/ep/vllm_outliertune-0.1.0.dist-info/entry_points.txt
export PYTHONPATH=$PWD:/tmp/ep:$PYTHONPATH OUTLIERTUNE_TILE_CONFIGS=/tmp/no-user-table.json PYTHONUNBUFFERED=1
