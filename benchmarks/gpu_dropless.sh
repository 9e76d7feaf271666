#!/usr/bin/env bash
# Issue 20's GPU figures in one run (about 7 minutes on an H100/H200):
# the grouped-matmul kernels against a dense matmul, one MoE layer's
# train step against a dense FFN (dropless on the kernel beside dropless
# in blocks), and a whole keras-hub Mixtral against its sparsified copy.
#
# On the device machine, from the repo root (see ../shared/gpu/README.md):
#   source .gpu/setup_device.sh; bash benchmarks/gpu_dropless.sh
# Tried on a CPU with tiny sizes first:
#   TINY=1 KERAS_BACKEND=jax bash benchmarks/gpu_dropless.sh
set -u
export KERAS_BACKEND=jax
if [ "${TINY:-0}" = 1 ]; then
  kernel=(--configs tiny --steps 2)
  layer=(--configs e8k2 --steps 2)
  model=(--models=mixtral --batch-size 2 --seq-len 64 --steps 2)
else
  kernel=(--configs gpu-e8k2,gpu-e64k8 --dtype bfloat16 --steps 10)
  layer=(--configs gpu-e8k2,gpu-e64k8 --dtype-policy mixed_bfloat16 --steps 10)
  model=(--models=mixtral-gpu --batch-size 8 --seq-len 1024 --steps 10
         --dtype-policy mixed_bfloat16)
fi
echo "== grouped matmul kernels"
timeout 120 python3 benchmarks/grouped_matmul_benchmark.py "${kernel[@]}"
echo "== one MoE layer, train step"
timeout 330 python3 benchmarks/dispatch_benchmark.py "${layer[@]}" \
  --variants ffn,sparse-1.0,sparse-1.25,dropless,dropless-blocks,keras-hub \
  --train-on-batch --no-memory
echo "== a whole keras-hub Mixtral"
timeout 180 python3 benchmarks/keras_hub_sparsify.py \
  "${model[@]}" --variants keras-hub,sparsified,sparsified-cf1.0 --no-memory
