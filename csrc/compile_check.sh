#!/usr/bin/env bash
# Compile every csrc/*.cu with plain nvcc (no torch headers) for sm_90a and sm_80, as CI does.
# Fails loudly on a compile error or a missing nvcc. A run whose exact inputs (sources, this script,
# nvcc version) already compiled cleanly on this machine is remembered in a stamp file and skipped,
# so the CI step and tests/test_cuda_build.py pay for one compile.
#   QVDIT_NVCC        nvcc to use (default: nvcc on PATH, else $CUDA_HOME/bin, /usr/local/cuda/bin)
#   QVDIT_CHECK_CACHE stamp directory (default: ${TMPDIR:-/tmp}/qvdit_compile_check); "off" disables it
set -euo pipefail
script="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$script")"
NVCC="${QVDIT_NVCC:-nvcc}"
for cand in "$NVCC" "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" /usr/local/cuda/bin/nvcc; do
  if command -v "$cand" >/dev/null 2>&1; then NVCC="$cand"; break; fi
done
if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "compile_check: nvcc not found (set QVDIT_NVCC, CUDA_HOME or put nvcc on PATH)" >&2
  exit 2
fi
sources=(*.cu)
ARCH=(-gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_80,code=sm_80)
# The half/bfloat16 macros are the ones torch's CUDAExtension adds: the extension build sees the same code.
FLAGS=(-std=c++17 -O3 -Xptxas=-warn-spills,-warn-lmem-usage --Werror=all-warnings -I.
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
       -D__CUDA_NO_HALF2_OPERATORS__)

cache="${QVDIT_CHECK_CACHE:-${TMPDIR:-/tmp}/qvdit_compile_check}"
# torch's include paths for the bindings step below (empty: no torch here, or QVDIT_CHECK_BINDINGS=0)
torch_incs=""
if [[ "${QVDIT_CHECK_BINDINGS:-1}" != 0 ]]; then
  torch_incs=$(python3 -c "import torch.utils.cpp_extension as c; print('\n'.join(c.include_paths()))" 2>/dev/null || true)
fi
key=$( { cat "$script" ./*.cu ./*.cuh ./*.h ./*.cpp; "$NVCC" --version; echo "$torch_incs"; } | sha256sum | cut -c1-32)
if [[ "$cache" != off && -f "$cache/$key.ok" ]]; then
  echo "compile_check: these exact sources already compiled cleanly ($cache/$key.ok)"
  exit 0
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
pids=()
for src in "${sources[@]}"; do
  ( "$NVCC" "${FLAGS[@]}" "${ARCH[@]}" -c "$src" -o "$out/${src%.cu}.o" >"$out/${src%.cu}.log" 2>&1 \
      || { echo "FAILED" >>"$out/${src%.cu}.log"; exit 1; } ) &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then status=1; fi
  src=${sources[$i]}
  if grep -q FAILED "$out/${src%.cu}.log"; then
    echo "compile_check: $src FAILED:" >&2
    cat "$out/${src%.cu}.log" >&2
  else
    echo "compile_check: $src ok (sm_90a, sm_80)"
  fi
done
if [[ $status -ne 0 ]]; then
  echo "compile_check: nvcc failed (see above)" >&2
  exit 1
fi

# bindings.cpp, the one file with torch headers, checked against the installed torch's headers (its C++ types and
# calls; the schemas are matched to the signatures only when the library loads): a CPU torch cannot build the
# extension, but its headers can check the bindings where there is no GPU. A CUDA build generates
# c10/cuda/impl/cuda_cmake_macros.h; a CPU wheel lacks it, so an empty stand-in is searched after the real paths.
# The CUDA headers: where nvcc itself looks (its --dryrun INCLUDES; nvcc may be a wrapper script).
cuda_inc=$("$NVCC" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/.*INCLUDES="-I\([^"]*\)".*/\1/p' | head -1)
if [[ ! -f bindings.cpp ]]; then
  :
elif [[ -z "$torch_incs" ]]; then
  echo "compile_check: bindings.cpp not checked (no torch here, or QVDIT_CHECK_BINDINGS=0)"
elif [[ ! -f "$cuda_inc/cuda_runtime.h" ]]; then
  echo "compile_check: bindings.cpp not checked (nvcc names no include directory with cuda_runtime.h)"
else
  mkdir -p "$out/stub/c10/cuda/impl" && echo "#pragma once" >"$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
  args=(-std=c++17 -fsyntax-only -Wall -Wextra -Werror -Wno-c++20-extensions -Wno-unused-parameter -I.)
  while IFS= read -r i; do args+=(-isystem "$i"); done <<<"$torch_incs"
  args+=(-isystem "$cuda_inc" -isystem "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')")
  if ! "${CXX:-c++}" "${args[@]}" -idirafter "$out/stub" -DTORCH_EXTENSION_NAME=qvdit_cuda bindings.cpp \
      >"$out/bindings.log" 2>&1; then
    echo "compile_check: bindings.cpp FAILED against torch's headers:" >&2
    cat "$out/bindings.log" >&2
    exit 1
  fi
  echo "compile_check: bindings.cpp ok (torch $(python3 -c 'import torch; print(torch.__version__)') headers)"
fi
if [[ "$cache" != off ]]; then mkdir -p "$cache" && touch "$cache/$key.ok"; fi
echo "compile_check: all ${#sources[@]} sources compiled"
