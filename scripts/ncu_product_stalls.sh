#!/bin/bash
# ncu of the products in eager decode steps (scripts/ncu_step.py): WarpStateStats, SourceCounters, SpeedOfLight and
# LaunchStats per kernel, then the warp stall samples per source line (scripts/ncu_source_lines.py). On the GPU
# machine: OUT=<folder> bash scripts/ncu_product_stalls.sh
set -x
export PYTHONPATH=.:tests AIM_RT_CACHE=$OUT/cache
PY=/opt/torch/.venv/bin/python
prof() {  # tag model batch kernel-regex skip
  ncu -k "regex:$4" --launch-skip $5 --launch-count 1 --section WarpStateStats --section SourceCounters \
      --section SpeedOfLight --section LaunchStats --import-source yes -f -o /tmp/$1 \
      $PY scripts/ncu_step.py --model $2 --batch $3 --steps 1 > /tmp/$1.log 2>&1
  ncu -i /tmp/$1.ncu-rep --page details > $OUT/$1.txt
  ncu -i /tmp/$1.ncu-rep --page source --csv --print-source sass | gzip > /tmp/$1.csv.gz
  k=$(grep -o "aim_[a-z0-9_]*" $OUT/$1.txt | head -1)
  blocks=$(grep -m1 -oE "\(([0-9]+), 1, 1\)x" $OUT/$1.txt | grep -oE "[0-9]+" | head -1)
  for c in $AIM_RT_CACHE/kernels/*.cubin; do
    $PY scripts/ncu_source_lines.py /tmp/$1.csv.gz $c plugins/aim_kernels.cu $blocks --kernel $k --top 25 \
      --metric "Warp Stall Sampling (All Samples)" >> $OUT/$1.txt 2>/dev/null && break
  done
}
prof g8 AiM-B 64 aim_gemm_m8 4
prof v16 AiM-B 16 aim_gemv 2
prof m2 AiM-XL 16 aim_gemm 4
ls -la $OUT
