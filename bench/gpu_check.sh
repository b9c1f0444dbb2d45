#!/usr/bin/env bash
# The one script to run on a lent GPU machine (see the device tool): the GPU tests
# (tests/test_gpu.py), then GPU benchmarks of the training loop and of CAGAN inference (256x256,
# batch 32), results as JSON under $OUT; exits with the tests' status.
# Installs nothing that is not carried: captum (for the deeplift and grad_cam tests) travels as
# a wheel in .whl/ (see README "GPU check"); torch, pytest and OpenCV are the machine's own.
#   run: bash bench/gpu_check.sh            (on the GPU machine, OUT set by the tool)
#   try: SMALL=1 OUT=/tmp/gpu-check bash bench/gpu_check.sh   (CPU, tiny sizes: tests the script)
set -euo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# Import the checkout as the cfrobust package without installing it.
mkdir -p /tmp/cfrobust-src && ln -sfn "$PWD" /tmp/cfrobust-src/cfrobust
export PYTHONPATH=/tmp/cfrobust-src${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" | tee "$OUT/env.txt"
set +e
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.txt"
tests_rc=${PIPESTATUS[0]}
set -e
python3 - "$tests_rc" "$OUT/gpu_tests.txt" > "$OUT/gpu_tests.json" <<'PY'
import json, sys
lines = [line for line in open(sys.argv[2]).read().splitlines() if line.strip()]
print(json.dumps({"exit_status": int(sys.argv[1]), "summary": lines[-1] if lines else ""}))
PY
if [ "${SMALL:-0}" = 1 ]; then
  args=(--arch simple-cnn --size 32 --batch 16 --device cpu --workers 1 --steps 3 --warmup 1 --repeats 1)
else
  args=(--arch resnet50 --size 224 --batch 64 --device cuda --workers 12 --steps 30 --repeats 2)
fi
python3 bench/train_bench.py "${args[@]}" --work /tmp/cfrobust-train-bench --json "$OUT/train_bench.json" \
  2>&1 | tee "$OUT/train_bench.txt"
if [ "${SMALL:-0}" = 1 ]; then
  cagan=(--device cpu --infer-batch 1 --infer-repeats 1)
else
  cagan=(--device cuda --infer-batch 32 --infer-repeats 5)
fi
python3 bench/cagan_bench.py --infer-only "${cagan[@]}" --json "$OUT/cagan_bench.json" 2>&1 | tee "$OUT/cagan_bench.txt"
echo "results in $OUT"
exit "$tests_rc"
