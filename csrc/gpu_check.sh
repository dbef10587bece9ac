#!/usr/bin/env bash
# The CUDA backend on a GPU machine, in one command: build the extension in place, run its tests on both
# GEMM kernels, compute-sanitizer memcheck + racecheck on small shapes, the benchmark, and an ncu view.
#
#   bash csrc/gpu_check.sh [build] [test] [suite] [sanitize] [bench] [linear] [e2e] [ncu] [ncu_norm] [ncu_norm_src] [ncu_src]
#   (none: build test sanitize; ncu_src: stall samples per SASS instruction of the small-K ws tile, ncu_stalls.py)
#
# $OUT (the device tool's folder; default /tmp/qvdit_gpu_check) gets steps.txt (all step output) and the
# benchmark's cuda_gpu_check.{json,md}. Through the device
# tool, from the repo root (bench_shapes.json travels in .work/, which is git-ignored and carried):
#   mkdir -p .work && cp ../shared/bench_shapes.json .work/
#   run(command="bash csrc/gpu_check.sh build test sanitize bench 2>&1 | tee $OUT/log.txt", carry=[".work"])
# The e2e stage needs diffusers, which the device image lacks: carry its wheel (.whl/, git-ignored) and prefix
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site &&
# Budget on an H200: build ~2-3 min cold, test ~3 min, sanitize ~40 s, bench ~2.5 min, linear ~40 s per shape
# (all 12: more than one call), e2e ~3 min; the whole suite without the interpreter takes more than 4.5 min (run it
# as its own call).
# QVDIT_CUDA_ARCH picks the targets (default here: sm_90a only, which also runs the mma.sync kernel).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/qvdit_gpu_check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
stages=("$@")
[[ ${#stages[@]} -eq 0 ]] && stages=(build test sanitize)
fails=()
LOG="$OUT/steps.txt"  # every step's full output in one file (the device tool returns at most 8 files)
: >"$LOG"
step() {  # step NAME CMD...: run it, append its output to $LOG, print its tail
  local name=$1; shift
  echo "=== $name: $*" | tee -a "$LOG"
  local t0=$SECONDS tmp
  tmp=$(mktemp)
  if "$@" >"$tmp" 2>&1; then echo "=== $name ok ($((SECONDS - t0)) s)"; tail -n 3 "$tmp"
  else echo "=== $name FAILED ($((SECONDS - t0)) s)"; tail -n 40 "$tmp"; fails+=("$name"); fi
  cat "$tmp" >>"$LOG"
  rm -f "$tmp"
}
has() { [[ " ${stages[*]} " == *" $1 "* ]]; }

nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
if has build; then
  export QVDIT_CUDA_ARCH="${QVDIT_CUDA_ARCH:--gencode=arch=compute_90a,code=sm_90a}" MAX_JOBS="${MAX_JOBS:-16}"
  step build python3 setup.py build_ext --inplace
  python3 -c "import qvdit_kernels._C as C; print('extension loaded; sm90 wgmma path available:', C.sm90_available())" \
    || fails+=(load)
  # what the build used and links: the extension must need the shared libstdc++ (BENCHMARKS run ws11: a static copy
  # inside it crashed on the first error message; setup.py links the shared one where the linker would not)
  echo "build standards: $(grep -oh -- '-std=[^ ]*' build/temp*/build.ninja 2>/dev/null | sort | uniq -c | tr '\n' ' ')"
  ldd qvdit_kernels/_C*.so 2>/dev/null | grep -E "stdc\+\+|gcc_s" || true
fi
if has test; then
  # (no -x: a failure, such as the child-process error tests of run ws10, must not hide the tests after it)
  step test_cuda_kernels python3 -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py
  step test_shared_auto python3 -m pytest -q -p no:cacheprovider tests/test_gemm.py tests/test_act_quant.py -k cuda
  # (tests/test_cuda_build.py is CPU-only, the host emulator and nvcc/g++ checks: CI runs it; 2.5 min here)
  step test_backends python3 -m pytest -q -p no:cacheprovider tests/test_backends.py tests/test_auto.py \
    tests/test_norm_quant.py
  # the fused Wan block on CUDA (fc2's codes over fc1's output) eager, compiled and CUDA-graph captured: these
  # need diffusers (carry its wheel, see the e2e note above; without it they skip, and this says so)
  python3 -c "import diffusers" 2>/dev/null || echo "=== test_models: diffusers missing, its tests will SKIP"
  step test_models python3 -m pytest -q -p no:cacheprovider -rs tests/test_fused_producers.py tests/test_compile.py
  QVDIT_CUDA_GEMM_PATH=sm80 step test_shared_sm80 python3 -m pytest -q -p no:cacheprovider tests/test_gemm.py -k cuda
  QVDIT_CUDA_GEMM_PATH=sm90ws QVDIT_WS_ROWS=256 step test_shared_sm90ws_256 \
    python3 -m pytest -q -p no:cacheprovider tests/test_gemm.py -k cuda
  QVDIT_CUDA_GEMM_PATH=sm90ws QVDIT_WS_PINGPONG=1 step test_shared_sm90ws_pingpong \
    python3 -m pytest -q -p no:cacheprovider tests/test_gemm.py -k cuda
  QVDIT_CUDA_GEMM_PATH=sm90ws QVDIT_WS_DEFER=1 step test_shared_sm90ws_defer \
    python3 -m pytest -q -p no:cacheprovider tests/test_gemm.py -k cuda
  # the shared tests with the tail fused in the ws kernel (opt-in; N odd: the staged epilogue's scalar path)
  QVDIT_CUDA_FUSED_TAIL=1 QVDIT_CUDA_GEMM_PATH=sm90ws step test_shared_sm90ws_fused_tail \
    python3 -m pytest -q -p no:cacheprovider tests/test_gemm.py -k cuda
fi
if has suite; then  # the whole suite without the interpreter, less the CPU-only emulator checks (> 4.5 min)
  step suite python3 -m pytest -q -p no:cacheprovider tests --ignore=tests/test_cuda_build.py
fi
if has sanitize; then
  for tool in memcheck racecheck synccheck; do
    step "sanitize_$tool" compute-sanitizer --tool "$tool" --error-exitcode 1 \
      python3 -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py -k sanitizer_smoke
  done
  step sanitize_norm_quant compute-sanitizer --tool memcheck --error-exitcode 1 \
    python3 -m pytest -q -p no:cacheprovider tests/test_norm_quant.py -k "cuda_norm_quant_real_widths and (1536 or 20480)"
fi
if has bench; then
  # the tail rows (--tails): Triton fuses the tail; CUDA here runs it after the kernel (the default), and in
  # the kernel in the bench_fused_tail step
  step bench python3 benchmarks/bench_cuda.py --kernels "triton,cuda sm90ws" --tails --out "$OUT" --tag gpu_check
  QVDIT_CUDA_FUSED_TAIL=1 step bench_fused_tail python3 benchmarks/bench_cuda.py --kernels "cuda sm90ws" --tails \
    --out "$OUT" --tag gpu_check_fused_tail
  # (QVDIT_WS_PINGPONG=1 and QVDIT_WS_DEFER=1 select tile modes measured slower: BENCHMARKS runs ws5, ws9)
fi
if has linear; then  # the CUDA rows beside Triton and auto routing in bench_linear (CUDA-graph timing: device time)
  step linear python3 benchmarks/bench_linear.py --backends triton,cuda,auto --graph --variants W3A6,W4A8 \
    --modes gemm,full --peers "" --out "$OUT" --tag gpu_check
fi
if has e2e; then  # Wan2.1-14B and -1.3B compiled with the fused forward and auto routing (CUDA GEMMs where the table
  # says), with the allocator's live set at the peak (--memory-trace; BENCHMARKS e2e run 7)
  for model in wan14b wan1.3b; do
    step "e2e_$model" python3 benchmarks/bench_e2e.py --models "$model" --settings bf16,w3a6 --modes compiled \
      --backend auto --reps 2 --no-profile --memory-trace --out "$OUT/e2e_${model}_compiled_auto.json"
  done
fi
if has ncu; then
  step ncu ncu --kernel-name regex:qgemm_sm90 -c 1 --section SpeedOfLight --section ComputeWorkloadAnalysis \
    --section WarpStateStats --section LaunchStats --section Occupancy \
    python3 benchmarks/bench_cuda.py --profile wan1.3b_fc1 --variants W3A6
fi
if has ncu_norm; then  # what the norm-quant kernel waits on (BENCHMARKS run nq4: 1.9-2.4x the act-quant's time on the
  # same bytes): the codes-only pass of wan1.3b's q/k/v input, beside the act-quant of the same rows
  step ncu_norm ncu --kernel-name regex:"norm_quant|act_quant" -c 2 --section SpeedOfLight --section WarpStateStats \
    --section LaunchStats --section Occupancy --section InstructionStats --section MemoryWorkloadAnalysis \
    python3 benchmarks/bench_cuda.py --profile wan1.3b_qkvo --variants W3A6
fi
if has ncu_norm_src; then  # the norm-quant's stall samples per SASS instruction (the codes-only pass above)
  rep="$OUT/norm_quant"
  step ncu_norm_src ncu --kernel-name regex:norm_quant -c 1 --set full -f -o "$rep" \
    python3 benchmarks/bench_cuda.py --profile wan1.3b_qkvo --variants W3A6
  step ncu_norm_src_page bash -c "ncu -i '$rep.ncu-rep' --page source --csv --print-source sass > '$OUT/norm_quant_sass.csv'"
  step ncu_norm_stalls python3 benchmarks/ncu_stalls.py "$OUT/norm_quant_sass.csv" --top 60 --outputs "32760*1536"
  rm -f "$rep.ncu-rep"
fi
if has ncu_src; then  # where the small-K ws tile waits (BENCHMARKS run ws9): stall samples per SASS instruction
  rep="$OUT/ws_small_k"
  step ncu_src ncu --kernel-name regex:qgemm_sm90_ws -c 1 --set full -f -o "$rep" \
    python3 benchmarks/bench_cuda.py --profile wan1.3b_fc1 --variants W3A6
  step ncu_src_page bash -c "ncu -i '$rep.ncu-rep' --page source --csv --print-source sass > '$OUT/ws_small_k_sass.csv'"
  step ncu_stalls python3 benchmarks/ncu_stalls.py "$OUT/ws_small_k_sass.csv" --top 60 --outputs "32760*8960"
fi
echo "=== summary: stages ${stages[*]}; failed: ${fails[*]:-none}"
[[ ${#fails[@]} -eq 0 ]]
