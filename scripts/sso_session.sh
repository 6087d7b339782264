#!/usr/bin/env bash
# One device run (2026-12-06, sixth session), in the order that matters when a run is cut short: aim_ssu_out's GPU
# tests (and the backend tests it touches); whole decode steps with and without it (alternating, one process,
# each kind of op alone too); then, with the faster build for AiM-B batch 1 (AIM_RT_SSU_OUT=0 if the two kernels
# won), the kernel table and `aim-rt bench` of AiM-B / AiM-XL at batch 1 / 16 / 64 (scripts/gpu_check.py), and a
# cold start. Usage (the device tool): OUT=dir bash scripts/sso_session.sh
set -u
export PYTHONPATH=.:tests
P=${PYTHON:-/opt/torch/.venv/bin/python}
O=${OUT:?set OUT}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 $P -m pytest -q -x -p no:cacheprovider tests/test_cuda_backend.py \
  -k "one_kernel or ssu_out or batch_composition or folds_the_residual or warp_state_update or norms_in_proj" \
  > $O/pytest_sso.txt 2>&1
tail -3 $O/pytest_sso.txt
V=build_b,build_b+sso0,build_xl,build_xl+sso0,build_l,build_l+sso0
timeout 240 $P scripts/ssu_bench.py --out $O --cases '' --variants $V --step-variants $V --op-times \
  --steps AiM-B:1,AiM-B:2,AiM-XL:1,AiM-XL:2,AiM-L:1 --tag sso_steps 2>&1 | grep -v -i warn | tail -14
WIN=$($P -c "
import json
rows = json.load(open('$O/sso_steps.json'))['steps']
r = next(r for r in rows if r['model'] == 'AiM-B' and r['batch'] == 1)
print(int(r['build_b_us_per_step'] < r['build_b+sso0_us_per_step']))" 2>/dev/null || echo 0)
echo "aim_ssu_out faster at AiM-B batch 1: $WIN"
[ "$WIN" = 1 ] || export AIM_RT_SSU_OUT=0
timeout 420 $P scripts/gpu_check.py --out $O --skip tests,parity,profile --models AiM-B,AiM-XL --torch-models "" \
  --batches 1,16,64 2>&1 | grep -v -i warn | tail -40
AIM_RT_CACHE=$(mktemp -d) timeout 60 $P scripts/cold_start.py 2>&1 | tail -3
