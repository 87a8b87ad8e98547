#!/usr/bin/env bash
# Prepare, on THIS machine (PyPI reachable, the repo's venv active), what benchmarks/gpu.sh needs on the
# lent NVIDIA machine, where nothing can be downloaded and at most 64 MiB travels per call:
#
#   .gpu/call1/  part 1 of the mlx-cuda-13 wheel (50 MB)             -> carried by call 1, stashed in /tmp
#   .gpu/call2/  part 2 of it, the small wheels, SHA256SUMS, and the
#                side files of the random checkpoint (tokenizer etc.) -> carried by call 2
#
# The wheels: mlx, mlx-cuda-13 (90 MB: too big for one call), mlx-lm, soxr, soundfile and cffi +
# pycparser (soundfile's; not on the machine). Everything else mlx-listen imports is there already
# (numpy, torch, transformers, tokenizers, sentencepiece, jinja2, pyyaml, protobuf, click, tqdm, scipy,
# matplotlib, huggingface-hub, safetensors; KINDS.md's list). .gpu/ is git-ignored, so it travels only
# where a call names it in `carry`. Then copy the two `run` calls from benchmarks/README.md ("GPU").
#
#   bash benchmarks/gpu_prepare.sh          # ~10 s plus the download
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
G=.gpu
LIMIT=$((64 * 1024 * 1024))
PART=50000000  # bytes of part 1; part 2 gets the rest (~40 MB) next to the small wheels
WHEELS=(mlx==0.32.4 mlx-cuda-13==0.32.4 mlx-lm==0.32.2 soxr==1.1.0 soundfile==0.14.0 cffi==2.1.1 pycparser==3.12)

git check-ignore -q "$G/x" || { echo "$G/ is not git-ignored: add '/.gpu/' to .gitignore first" >&2; exit 1; }
rm -rf "$G/call1" "$G/call2" "$G/dl"
mkdir -p "$G/dl" "$G/call1" "$G/call2/whl"

plat=()
for p in manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64 \
         manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  plat+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${plat[@]}" -d "$G/dl" "${WHEELS[@]}" 2>&1 | grep -v "^WARNING: Location" || true
n=$(ls "$G/dl"/*.whl | wc -l)
[ "$n" -eq "${#WHEELS[@]}" ] || { echo "expected ${#WHEELS[@]} wheels, got $n:"; ls "$G/dl"; exit 1; } >&2

big=$(cd "$G/dl" && ls mlx_cuda_13-*.whl)
(cd "$G/dl" && sha256sum "$big") >"$G/call2/SHA256SUMS"
split -b "$PART" -d -a 1 "$G/dl/$big" "$G/dl/$big.part"
[ "$(ls "$G/dl/$big".part* | wc -l)" -eq 2 ] || { echo "expected 2 parts of $big" >&2; exit 1; }
mv "$G/dl/$big.part0" "$G/call1/"
mv "$G/dl/$big.part1" "$G/call2/"
(cd "$G/call1" && sha256sum "$big.part0") >"$G/call1/SHA256SUMS"
echo "$big" >"$G/call2/WHEEL"
rm "$G/dl/$big"
mv "$G/dl"/*.whl "$G/call2/whl/"
rmdir "$G/dl"
(cd "$G/call2/whl" && sha256sum *.whl) >>"$G/call2/SHA256SUMS"

# The random checkpoint's tokenizer and processor files, built here with this venv's transformers.
"$PY" benchmarks/bench_gpu.py --prepare-side "$G/call2/side" >/dev/null

# What each call sends: the working tree (tracked + untracked-not-ignored files) plus its carry.
tree=$("$PY" - <<'EOF'
import os, subprocess
names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], capture_output=True, check=True).stdout
print(sum(os.lstat(n).st_size for n in names.decode().split("\0") if n and os.path.lexists(n)))
EOF
)
ok=1
for c in call1 call2; do
  size=$(du -sb "$G/$c" | cut -f1)
  total=$((tree + size))
  printf '%s: working tree %.1f MB + .gpu/%s %.1f MB = %.1f MB (limit %.1f MB)\n' "$c" \
    "$(echo "$tree / 1000000" | bc -l)" "$c" "$(echo "$size / 1000000" | bc -l)" \
    "$(echo "$total / 1000000" | bc -l)" "$(echo "$LIMIT / 1000000" | bc -l)"
  [ "$total" -lt $((LIMIT - 4000000)) ] || { echo "  $c is too close to the limit" >&2; ok=0; }
done
ls -la "$G/call1" "$G/call2" "$G/call2/whl"
[ "$ok" -eq 1 ] || exit 1
echo "Ready: run the two calls of benchmarks/README.md (GPU), the second right after the first."
