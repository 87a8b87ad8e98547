#!/usr/bin/env bash
# The GPU benchmark on the lent NVIDIA machine (MLX's CUDA backend), in two calls on one warm machine,
# after `bash benchmarks/gpu_prepare.sh` here (README.md, "GPU", has the exact `run` calls):
#
#   bash benchmarks/gpu.sh 1        call 1, carry .gpu/call1: stash part 1 of the mlx-cuda-13 wheel in
#                                   /tmp (outside the repo copy), print the machine; ~5 s
#   bash benchmarks/gpu.sh 2 [ARGS] call 2, carry .gpu/call2: reassemble and check the wheel, install the
#                                   wheels into /tmp/site, smoke-test MLX on the GPU, then run
#                                   benchmarks/bench_gpu.py ARGS; results in $OUT (results.json, table.md,
#                                   log.txt), written as they come
#
# Call 2 must follow call 1 at once: the machine is given back after 30 s idle, and a fresh one has
# no part 1 (call 2 then stops at once with exit 3: run both calls again). A later call 2 on the same
# warm machine skips the install (e.g. `bash benchmarks/gpu.sh 2 --phases torch` reuses the build in
# /tmp/bench-gpu). Nothing is built here that CI needs; the machine keeps nothing.
# Exit codes: 2 carry missing or damaged, 3 part 1 missing, 4 checksums, 5 pip, 6 MLX smoke test,
# else bench_gpu.py's. GPU_ALLOW_CPU=1 lets the smoke test pass on a CPU (testing this script only).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
R=$(pwd)
STASH=${GPU_STASH:-/tmp/mlx-listen-gpu}
SITE=${GPU_SITE:-/tmp/site}
WORK=${GPU_WORK:-/tmp/bench-gpu}
export OUT=${OUT:-$R/.gpu/out}
mkdir -p "$OUT" "$STASH"
step=${1:-}
shift || true

machine() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,clocks.mem \
    --format=csv 2>/dev/null || echo "nvidia-smi: not available"
  python3 -c 'import sys; print("python", sys.version.split()[0], sys.executable)'
  echo "disk: $(df -h /tmp | tail -1)"; echo "memory: $(free -g | sed -n 2p)"; echo "cpus: $(nproc)"
}

case "$step" in
1)
  cp .gpu/call1/*.part0 "$STASH/" && (cd "$STASH" && sha256sum -c --quiet "$R/.gpu/call1/SHA256SUMS") \
    || { echo "call 1: part 1 did not arrive whole" >&2; exit 2; }
  echo "call 1: part 1 stashed in $STASH"
  machine
  python3 -m pip list 2>/dev/null | grep -iE '^(mlx|cffi|pycparser|soxr|soundfile|numpy|torch|transformers|tokenizers|nvidia-(cublas|cudnn|cuda-nvrtc|cuda-runtime|cufft|cusolver|nccl))[ -]' | tr -s ' ' | paste -sd ';'
  echo "call 1 done: start call 2 NOW (bash benchmarks/gpu.sh 2)"
  ;;
2)
  t0=$(date +%s)
  whl=$(cat .gpu/call2/WHEEL) || { echo "call 2: .gpu/call2 missing (carry it)" >&2; exit 2; }
  if cmp -s "$SITE/.installed" .gpu/call2/SHA256SUMS; then
    echo "call 2: the wheels are installed in $SITE already (an earlier call 2 on this machine)"
  else
    part0=""
    for p in "$STASH/$whl.part0" ".gpu/call1/$whl.part0"; do [ -f "$p" ] && { part0=$p; break; }; done
    [ -n "$part0" ] || { echo "call 2: part 1 of $whl is not on this machine (a fresh machine?): run call 1, then call 2 at once" >&2; exit 3; }
    cat "$part0" ".gpu/call2/$whl.part1" >"$STASH/$whl"
    cp .gpu/call2/whl/*.whl "$STASH/"
    (cd "$STASH" && sha256sum -c --quiet "$R/.gpu/call2/SHA256SUMS") || { echo "call 2: wheel checksums differ" >&2; exit 4; }
    # Only the carried wheels, into their own folder: the machine's torch, numpy, nvidia-* stay as they are.
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$STASH/$whl" $(cd .gpu/call2/whl && ls *.whl | sed "s|^|$STASH/|") || { echo "call 2: pip install failed" >&2; exit 5; }
    cp .gpu/call2/SHA256SUMS "$SITE/.installed"
  fi
  # libmlx.so finds CUDA through $ORIGIN/../../nvidia/* (a pip layout): point that at the machine's nvidia-* wheels.
  NV=$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])' 2>/dev/null) || NV=""
  if [ -n "$NV" ]; then
    [ -e "$SITE/nvidia" ] || ln -s "$NV" "$SITE/nvidia"
    LIBS=$(find -L "$NV" -maxdepth 3 -name 'lib*.so*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd:)
    export LD_LIBRARY_PATH="${LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
  # NVRTC (MLX's JIT kernels) needs the CUDA runtime headers.
  if [ -z "${CUDA_HOME:-}" ]; then
    for h in /usr/local/cuda "$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /x/x/x)")")" "$NV/cu13" "$NV/cuda_runtime"; do
      [ -f "$h/include/cuda_runtime.h" ] && { export CUDA_HOME=$h; break; }
    done
  fi
  echo "nvidia wheels: ${NV:-none}; CUDA_HOME=${CUDA_HOME:-unset}; installed in $(( $(date +%s) - t0 )) s"
  export PYTHONPATH="$SITE:$R" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
  export MLX_PTX_CACHE_DIR=${MLX_PTX_CACHE_DIR:-/tmp/mlx-ptx}
  machine
  # Smoke test: GPU device, cuBLAS, a JIT-compiled (NVRTC) fused kernel, bf16, the 4-bit matmul, FFT.
  python3 - <<'EOF' 2>&1 | tee "$OUT/smoke.txt" || { echo "call 2: MLX on the GPU failed its smoke test" >&2; exit 6; }
import sys, time
t = time.perf_counter()
import mlx.core as mx
print("mlx", mx.__version__, mx.default_device(), "cuda available:", mx.cuda.is_available())
import os
assert mx.default_device() == mx.gpu or os.environ.get("GPU_ALLOW_CPU") == "1", "MLX is not on the GPU"
a = mx.ones((1024, 1024), dtype=mx.bfloat16)
assert (a @ a).astype(mx.float32).sum().item() == 1024 ** 3
f = mx.compile(lambda x: mx.exp(-x) * 2 + 1)
assert abs(f(mx.zeros((1000,))).sum().item() - 3000) < 1e-3
w = mx.random.normal((512, 512)).astype(mx.bfloat16)
x = mx.random.normal((4, 512)).astype(mx.bfloat16)
wq, s, b = mx.quantize(w, group_size=64, bits=4)
y = mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=4).astype(mx.float32)
ref = x.astype(mx.float32) @ mx.dequantize(wq, s, b, group_size=64, bits=4).astype(mx.float32).T
err = (mx.linalg.norm(y - ref) / mx.linalg.norm(ref)).item()
print("4-bit matmul rel err %.1e" % err)
assert err < 0.1
print("fft", mx.fft.rfft(mx.ones((400,))).shape, "smoke ok in %.1f s" % (time.perf_counter() - t))
EOF
  echo "== bench_gpu.py (started $(( $(date +%s) - t0 )) s into call 2)"
  python3 benchmarks/bench_gpu.py --work "$WORK" --out "$OUT" --keep "$@" 2>&1 | tee "$OUT/log.txt"
  rc=${PIPESTATUS[0]}
  echo "call 2 done in $(( $(date +%s) - t0 )) s (bench exit $rc)"
  exit "$rc"
  ;;
*)
  echo "usage: bash benchmarks/gpu.sh 1 | 2 [bench_gpu.py args]" >&2
  exit 64
  ;;
esac
