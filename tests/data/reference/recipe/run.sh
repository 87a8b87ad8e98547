#!/usr/bin/env bash
# Reference bundles for the tiny test models on CUDA (fp32 with bf16 drift, and bf16).
set -uo pipefail
R=$(pwd)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p /tmp/run && cd /tmp/run   # not the repo root: its mlx_listen/ would shadow the installed package
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
mkdir -p /tmp/b
for m in gqa mha; do
  python3 -m mlx_listen_convert.reference.run --model $R/.gpu/$m-hf --items $R/.gpu/items.json --out /tmp/b/$m-cuda-fp32 --dtype float32 --drift --device cuda --max-new-tokens 24 --heads $R/.gpu/H.json --steer --alpha 1.5 || exit 2
  python3 -m mlx_listen_convert.reference.run --model $R/.gpu/$m-hf --items $R/.gpu/items.json --out /tmp/b/$m-cuda-bf16 --dtype bfloat16 --device cuda --max-new-tokens 24 --heads $R/.gpu/H.json --steer --alpha 1.5 || exit 3
done
tar -C /tmp/b -cf $OUT/bundles.tar . && ls -la /tmp/b/*
