#!/usr/bin/env bash
# Runs the invariance tests (accumulation, packing, processes, resume, peer losses, batched vs alone) under
# several kernel choices: each setting changes the summation order of the same maths, which is what moving
# to another CPU kind does (issue 20). A tolerance tuned on one machine fails here first.
#   scripts/invariance_sweep.sh [extra pytest args]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
K="equal or bitwise or follows or matches or same or invarian"
FILES="tests/test_train.py tests/test_dpo.py tests/test_orpo.py tests/test_kto.py tests/test_packing.py
       tests/test_native.py tests/test_cross_entropy.py tests/test_distributed.py tests/test_generate.py
       tests/test_decode.py tests/test_merge.py tests/test_export.py tests/test_signals.py tests/test_streaming.py
       tests/test_seq2seq.py tests/test_chat.py"
grep -o -m1 'amx_bf16\|avx512_bf16\|avx512f\|avx2' /proc/cpuinfo | sort -u | tr '\n' ' '; echo
status=0
for setting in "ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2" "ONEDNN_MAX_CPU_ISA=AVX512_CORE" \
               "OMP_NUM_THREADS=1" "ONEDNN_MAX_CPU_ISA=DEFAULT"; do
  echo "=== $setting"
  env $setting "$PY" -m pytest -q -p no:cacheprovider -k "$K" $FILES "$@" > "${TMPDIR:-/tmp}/sweep-$$.log" 2>&1 \
    || status=1
  grep -E "^(FAILED|ERROR)|passed|failed" "${TMPDIR:-/tmp}/sweep-$$.log"
done
exit $status
