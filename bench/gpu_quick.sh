#!/usr/bin/env bash
# One call on a lent GPU, under 10 minutes with the install: the model's constants and every case
# measured beside the model's prediction (bench/gpu_quick.py says what and in which order).
# Usage (device tool, from the repository root): bash bench/gpu_quick.sh
#   Peers travel as wheels: put liger-kernel / cut-cross-entropy wheels in .whl/ and carry it.
#   $OUT gets quick.jsonl (one record per measurement, written as measured), quick.log, summary.md,
#   install.log: commit quick.jsonl and summary.md under bench/results/ and note them in bench/NOTES.md.
set -uo pipefail
OUT=${OUT:-/tmp/fused_tau_quick}
mkdir -p "$OUT"
start=$SECONDS
pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log"; exit 1; }
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl >> "$OUT/install.log" 2>&1 && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
left=$((570 - (SECONDS - start)))
# the Python side stops starting measurements 60 s before the hard limit (torch.compile goes last)
PYTHONUNBUFFERED=1 timeout "$left" python -m bench.gpu_quick --out "$OUT/quick.jsonl" --summary "$OUT/summary.md" \
    --budget-s $((left - 60)) 2>&1 | tee "$OUT/quick.log"
echo "gpu_quick rc=${PIPESTATUS[0]} after $((SECONDS - start)) s"
