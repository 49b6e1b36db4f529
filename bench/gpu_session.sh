#!/usr/bin/env bash
# One call on a lent GPU (the device tool runs it from the repository root; $OUT comes back):
#   install the checkout, run the suite on the Triton path (tests/test_compile.py: compiled steps on CUDA),
#   python -m bench, and the MoCo run eager and under torch.compile.
# Usage (device tool): bash bench/gpu_session.sh      -- then commit $OUT/bench.{json,md,png} under bench/results/.
set -uo pipefail
OUT=${OUT:-/tmp/fused_tau_out}
mkdir -p "$OUT"
pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log"; exit 1; }
python - <<'PY' | tee "$OUT/versions.txt"
import torch, triton, datetime
print(datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
PY
# the kernels on the GPU (tests that build CUDA tensors through the `device` fixture run compiled kernels)
FUSED_TAU_TEST_BACKENDS=triton timeout 420 python -m pytest tests -q -x -p no:cacheprovider \
    --ignore=tests/test_model.py > "$OUT/tests.log" 2>&1
echo "tests rc=$?  ($(tail -1 "$OUT/tests.log"))"
# python -m bench writes bench.md and bench.png beside bench.json itself; its stdout is the same table
python -m bench --out "$OUT/bench.json" > "$OUT/bench.stdout.txt" 2> "$OUT/bench.log"
echo "bench rc=$?"
tail -60 "$OUT/bench.md"
# a real MoCo run on the GPU, eager and with each step's forward under torch.compile(fullgraph=True)
timeout 300 python bench/train_moco.py --steps 500 --no-plot --out "$OUT/moco_eager" > "$OUT/moco_eager.log" 2>&1
echo "train_moco eager rc=$?"; tail -3 "$OUT/moco_eager.log"
timeout 300 python bench/train_moco.py --steps 500 --no-plot --compile --out "$OUT/moco_compiled" > "$OUT/moco_compiled.log" 2>&1
echo "train_moco compiled rc=$?"; tail -3 "$OUT/moco_compiled.log"
