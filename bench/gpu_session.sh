#!/usr/bin/env bash
# One device call: install the wheels the GPU machine lacks (.whl, carried), map kernels/ to
# atom_stream.kernels, then run the named sections, each under its own time limit, logging to
# $OUT. Sections: tests | tests2 | tests3 | sidestream | ab | serve | attn | decode | profile | moe | moetc | smallm | smsweep | probe | ladder | mlaladder | mlafp8 | tests4 | mlav3 | gtests | fp8lin | idle | m1 | mlaf8 | profseq | pairm | tcladder | tile | tilesweep | tiletests | tptests | tpdecode | tpab | topo | moeab | align | aw | cfgab | ncu | down2 | dq | splits | kernels | prefill | ttft | downladder | allreduce | pyt | prefix
#   bash bench/gpu_session.sh tests decode        (default: tests decode)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1
# several GPUs: NVLink multicast stays off (device/KINDS.md)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
[ -e atom_stream/kernels ] || ln -s ../kernels atom_stream/kernels
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
PY="python3 -m pytest -q -p no:cacheprovider -o addopts="
sec() {  # sec NAME LIMIT_S COMMAND...: run, keep the log, print its tail
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "=== $name rc=$rc $(( $(date +%s) - t0 ))s"; grep -v Warning "$OUT/$name.log" | tail -${TAIL:-14}
}
sections=("$@"); [ ${#sections[@]} -eq 0 ] && sections=(tests decode)
for what in "${sections[@]}"; do case $what in
  tests) sec tests ${T_TESTS:-240} $PY -m gpu -x --maxfail=20 \
      tests/test_model_kernels.py tests/test_gpu_engine.py tests/test_gpu_engine_core.py \
      tests/test_kernels_norm_rope.py tests/test_fp8_linear.py tests/test_w4a8_kernel.py \
      tests/test_kernels_moe.py tests/test_ep_kernels.py tests/test_quant_gpu.py ;;
  tests2) sec tests2 ${T_TESTS:-240} $PY -m gpu --maxfail=30 tests/test_kernels_attention.py \
      tests/test_async_scheduling.py tests/test_model_kernels.py tests/test_gpu_engine.py \
      tests/test_gpu_engine_core.py tests/test_quant_gpu.py tests/test_w4a8_kernel.py \
      tests/test_fp8_linear.py tests/test_kernels_norm_rope.py ;;
  tests3) sec tests3 ${T_TESTS:-150} $PY -m gpu --maxfail=30 tests/test_async_scheduling.py \
      tests/test_gpu_engine.py tests/test_gpu_engine_core.py tests/test_model_kernels.py \
      tests/test_quant_gpu.py tests/test_w4a8_kernel.py tests/test_kernels_norm_rope.py \
      "tests/test_fp8_linear.py::test_kernel_real_shapes_gpu" ;;
  sidestream) for v in 0 1; do export ATOM_STREAM_SIDE_STREAM=$v; sec side$v ${T_DECODE:-60} \
      python3 bench/decode.py --preset "${PRESET:-k25-tp8-rank}" --batches "${BATCHES:-1,64}" \
      --ctx 1024 --iters 20 --out "$OUT/decode-side$v.json"; done; export ATOM_STREAM_SIDE_STREAM=0 ;;
  ab) for v in ${AB_VALS:-0 1}; do export $AB_VAR=$v; sec ab-$v ${T_DECODE:-60} \
      python3 bench/decode.py --preset "${PRESET:-k25-tp8-rank}" --batches "${BATCHES:-1,64}" \
      --ctx 1024 --iters 20 ${DECODE_EXTRA:-} --out "$OUT/decode-ab$v.json"; done; unset $AB_VAR ;;
  serve) OUT=$OUT timeout ${T_SERVE:-300} bash bench/serve_gpu.sh; echo "=== serve rc=$?"
      tar czf "$OUT/serving.tgz" -C "$OUT" serving && rm -rf "$OUT/serving" ;;  # <= 8 files return
  attn) sec attn ${T_ATTN:-200} python3 bench/kernels_attention.py --out "$OUT/kernels-attn-h200.json" \
      --sweep-out "$OUT/kernels-attn-sweep-h200.json" ;;
  decode) sec decode ${T_DECODE:-240} python3 bench/decode.py --preset "${PRESET:-k25-tp8-rank}" \
      --batches "${BATCHES:-1,16,64,256}" --ctx "${CTX:-1024,8192}" --iters 10 --out "$OUT/decode.json" ;;
  profile) sec profile ${T_PROFILE:-200} python3 bench/decode.py --preset "${PRESET:-k25-tp8-rank}" \
      --batches 1,64 --ctx 1024 --iters 5 --profile --out "$OUT/decode-profile.json" ;;
  moe) sec moe ${T_MOE:-240} python3 bench/kernels_moe.py --formats "${MOE_FORMATS:-w4a8,int4,mxfp4}" \
      --budget-s 150 --out "$OUT/kernels-moe-h200.json" --sweep-out "$OUT/kernels-moe-sweep-h200.json" ;;
  smallm) sec smallm-test ${T_TESTS:-150} $PY -m gpu tests/test_moe_small_m.py
      sec smallm ${T_MOE:-200} python3 bench/moe_small_m.py --budget-s 150 \
      --out "$OUT/moe-small-m-h200.json" ;;
  moetc) sec moetc-test ${T_TESTS:-200} $PY -m gpu tests/test_kernels_moe.py
      sec moetc ${T_MOE:-240} python3 bench/kernels_moe.py --formats "${MOE_FORMATS:-int4,mxfp4}" \
      --ms 16,64,256 --set tc --budget-s 170 --out "$OUT/kernels-moe-tc-h200.json" \
      --sweep-out "$OUT/kernels-moe-tc-sweep-h200.json" ;;
  tests4) sec tests4 ${T_TESTS:-240} $PY -m gpu --maxfail=30 tests/test_w4a8_kernel.py \
      tests/test_quant_gpu.py tests/test_kernels_attention.py ;;
  smsweep) sec smsweep-test ${T_TESTS:-150} $PY -m gpu tests/test_moe_small_m.py
      sec smsweep ${T_MOE:-150} python3 bench/moe_small_m.py --sweep --budget-s 110 \
      --out "$OUT/moe-small-m-sweep-h200.json" ;;
  probe) sec probe ${T_PROBE:-90} python3 bench/moe_read_probe.py --out "$OUT/moe-read-probe-h200.json" ;;
  mlafp8) sec mlafp8 ${T_ATTN:-170} python3 bench/kernels_attention.py --set variants --dtypes ${MLA_DTYPES:-fp8} \
      --merge-kernel --budget-s ${MLA_BUDGET:-130} --out "$OUT/kernels-attn-v3mk-h200.json" ;;
  ladder) sec ladder ${T_LADDER:-150} python3 bench/moe_gemv_ladder.py --budget-s 95 \
      --out "$OUT/moe-gemv-ladder-h200.json" ;;  # TAIL=60 for the whole table
  mlaladder) sec mlaladder ${T_MLALADDER:-170} python3 bench/mla_decode_ladder.py --budget-s 100 \
      --out "$OUT/mla-decode-ladder-h200.json" ;;  # TAIL=120 for the whole table
  mlav3) sec mlav3 ${T_ATTN:-200} python3 bench/kernels_attention.py --set variants --budget-s 120 \
      --out "$OUT/kernels-attn-v3-h200.json" ;;
  gtests) sec gtests ${T_TESTS:-200} $PY -m gpu --maxfail=30 tests/test_silu_mul.py \
      tests/test_mla_prologue.py tests/test_moe_small_m.py tests/test_moe_gemv_ladder.py \
      tests/test_mla_decode_ladder.py tests/test_model_kernels.py \
      "tests/test_kernels_attention.py" -k "${GTESTS_K:-not nothing}" ;;
  profseq) sec profseq ${T_PROFILE:-120} python3 bench/decode.py --preset "${PRESET:-k25-tp8-rank}" \
      --batches "${BATCHES:-1}" --ctx 1024 --iters 5 --profile --profile-seq ${SEQ:-70} \
      --out "$OUT/decode-profseq.json" ;;
  tcladder) sec tcladder-test ${T_TESTS:-120} $PY -m gpu tests/test_moe_tc_ladder.py
      sec tcladder ${T_LADDER:-260} python3 bench/moe_tc_ladder.py --budget-s ${BUDGET:-200} \
      --ms "${MS:-64,256}" --out "$OUT/moe-tc-ladder-h200.json" ;;
  tile) sec tile-test ${T_TESTS:-150} $PY -m gpu tests/test_moe_w13_tiled.py
      sec tile ${T_MOE:-170} python3 bench/kernels_moe.py --formats int4,mxfp4 --set default \
      --ms "${MS:-1,4,8,16,64,256}" --w13-tiles 1,16 --out "$OUT/kernels-moe-tile-h200.json" \
      --sweep-out "$OUT/kernels-moe-tile-sweep-h200.json" ;;
  tilesweep) sec tilesweep-sm ${T_MOE:-120} python3 bench/kernels_moe.py --formats int4,mxfp4 \
      --set tile --ms 1,4,8 --w13-tiles 1,16 --budget-s 100 --out "$OUT/tile-sm.json" \
      --sweep-out "$OUT/tile-sm-sweep.json"
      sec tilesweep-tc ${T_MOE:-120} python3 bench/kernels_moe.py --formats int4,mxfp4 \
      --set tile --ms 16,64,256 --w13-tiles 16 --budget-s 100 --out "$OUT/tile-tc.json" \
      --sweep-out "$OUT/tile-tc-sweep.json" ;;
  tiletests) ATOM_STREAM_MOE_W13_TILE=16 sec tiletests ${T_TESTS:-150} $PY -m gpu \
      --maxfail=10 tests/test_quant_gpu.py tests/test_gpu_engine.py tests/test_model_kernels.py ;;
  pairm) sec pairm ${T_MOE:-150} python3 bench/moe_small_m.py --pair-m --budget-s 100 --jobs 12 \
      --out "$OUT/moe-pair-m-h200.json" ;;
  m1) sec m1-test ${T_TESTS:-150} $PY -m gpu tests/test_moe_m1_gate_up.py
      sec m1 ${T_MOE:-150} python3 bench/moe_small_m.py --m1-kernel --budget-s 110 \
      --out "$OUT/moe-m1-gate-up-h200.json" ;;
  mlaf8) sec mlaf8-test ${T_TESTS:-150} $PY -m gpu tests/test_mla_decode_ladder.py -k "f8"
      sec mlaf8 ${T_MLALADDER:-170} python3 bench/mla_decode_ladder.py --budget-s 100 \
      --groups 1,2,7,8,9,10,11 --out "$OUT/mla-decode-ladder-f8-h200.json" ;;
  fp8lin) sec fp8lin ${T_FP8:-120} python3 bench/fp8_linear.py --out "$OUT/fp8_linear.json" ;;
  idle) for m in ${MODES:-async sync}; do  # one process per mode: two engines do not fit
      sec idle-$m ${T_IDLE:-100} python3 bench/engine_idle.py --preset "${PRESET:-k25-tp8-rank}" \
      --batches 1,16,64 --ctx 1024 --steps 30 --modes $m --out "$OUT/engine_idle-$m.json"; done ;;
  tptests) sec tptests ${T_TESTS:-240} $PY -m gpu -v -x --timeout 100 tests/test_tp_gpu.py \
      "tests/test_gpu_engine.py::test_moe_reference_loop_under_graph_capture_matches_eager" ;;
  tpdecode) sec tpdecode ${T_DECODE:-300} python3 bench/decode_tp.py --preset "${TP_PRESET:-k25-tp4-rank}" \
      --batches "${BATCHES:-1,16,64}" --ctx "${CTX:-1024,8192}" --iters 10 --out "$OUT/decode-tp.json" ;;
  tpab) for v in ${AB_VALS:-0 1}; do ATOM_STREAM_SYMM_ALLREDUCE=$v sec tpab-$v ${T_DECODE:-200} \
      python3 bench/decode_tp.py --preset "${TP_PRESET:-k25-tp4-rank}" --batches "${BATCHES:-1,16,64}" \
      --ctx "${CTX:-1024}" --iters 20 --out "$OUT/decode-tp-symm$v.json"; done ;;
  moeab) CFGS='{}'  # sweep each SET, pick its winner (int4, every pick-M), A/B all in the step
      for set in ${SETS:-down}; do
        case $set in down) ms=64,256 pm=64,256 ;; *) ms=$MS pm=${PICK_MS:-$MS} ;; esac
        sec sweep-$set ${T_MOE:-150} python3 bench/kernels_moe.py --formats "${MOE_FORMATS:-int4,mxfp4}" \
        --set $set --ms $ms --w13-tiles 16 --budget-s ${BUDGET:-110} --out "/tmp/km-$set.json" \
        --sweep-out "$OUT/kernels-moe-$set-sweep.json"
        c=$(python3 bench/moe_best_config.py "$OUT/kernels-moe-$set-sweep.json" --ms $pm \
        2> "$OUT/pick-$set.log"); cat "$OUT/pick-$set.log"
        CFGS=$(python3 -c 'import json, sys; print(json.dumps(json.loads(sys.argv[1]) | json.loads(sys.argv[2])))' "$CFGS" "$c")
      done; echo "=== picked ATOM_STREAM_MOE_CFG=$CFGS"
      if [ "$CFGS" != '{}' ]; then for v in default picked; do c='{}'; [ $v = picked ] && c=$CFGS
        ATOM_STREAM_MOE_CFG=$c sec decode-$v ${T_DECODE:-110} python3 bench/decode.py \
        --preset "${PRESET:-k25-tp8-rank}" --batches "${BATCHES:-1,4,64,256}" --ctx 1024 --iters 20 \
        --out "$OUT/decode-moe-$v.json"; done; fi ;;
  align) sec align ${T_ALIGN:-90} python3 bench/moe_align_bench.py --out "$OUT/moe-align.json" \
      --ms "${ALIGN_MS:-16,64,256,1024,4096,8192}" --warps "${ALIGN_WARPS:-4}" ;;
  aw) sec aw ${T_MOE:-200} python3 bench/kernels_moe.py --formats "${MOE_FORMATS:-int4}" \
      --set aw --ms "${MS:-64,256}" --w13-tiles 16 --budget-s ${BUDGET:-150} \
      --out /tmp/km-aw.json --sweep-out "$OUT/kernels-moe-aw-sweep.json" ;;
  dq) sec dq ${T_MOE:-200} python3 bench/kernels_moe.py --formats "${MOE_FORMATS:-int4}" \
      --set dq --ms "${MS:-16,64,256}" --w13-tiles 16 --budget-s ${BUDGET:-150} \
      --out /tmp/km-dq.json --sweep-out "$OUT/kernels-moe-dq-sweep.json" ;;
  splits) sec splits ${T_ATTN:-200} python3 bench/kernels_attention.py --set splits \
      --dtypes "${MLA_DTYPES:-bf16,fp8}" --budget-s ${MLA_BUDGET:-150} --out "$OUT/kernels-attn-splits.json" ;;
  ncu) NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
      sec ncu ${T_NCU:-240} "$NCU" --clock-control none --profile-from-start off --csv \
      --page raw --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
      --section ComputeWorkloadAnalysis --section SchedulerStats --section WarpStateStats \
      --section LaunchStats --section InstructionStats --log-file "$OUT/ncu-raw.csv" \
      python3 bench/ncu_probe.py --what "${NCU_WHAT:-moe,mla}" --ms "${MS:-64,256}" \
      --mla-shapes "${MLA_SHAPES:-64x8192}" ;;
  cfgab) for kv in ${CFG_AB:-base=\{\}}; do k=${kv%%=*}; v=${kv#*=}  # label=ATOM_STREAM_MOE_CFG
      ATOM_STREAM_MOE_CFG=$v sec cfgab-$k ${T_DECODE:-60} python3 bench/decode.py \
      --preset "${PRESET:-k25-tp8-rank}" --batches "${BATCHES:-16,64,256}" --ctx 1024 --iters 20 \
      ${DECODE_EXTRA:-} --out "$OUT/decode-cfg-$k.json"; done ;;
  down2) sec down2 ${T_MOE:-170} python3 bench/kernels_moe.py --formats int4,mxfp4 --set down \
      --ms "${MS:-64,256}" --w13-tiles 16 --budget-s ${BUDGET:-130} --out /tmp/kernels-moe-down2.json \
      --sweep-out "$OUT/kernels-moe-down2-sweep.json" ;;
  kernels) cp bench/results/kernels-h200.json "$OUT/"  # rows not rerun are kept
      sec kernels ${T_KERNELS:-300} python3 bench/kernels.py ${KERNELS_ARGS:---no-tune} \
      --out "$OUT/kernels-h200.json" ;;
  prefill) sec prefill ${T_MOE:-200} python3 bench/kernels_moe.py --formats "${MOE_FORMATS:-int4,mxfp4}" \
      --set prefill --ms "${MS:-1024,8192,4096}" --w13-tiles 16 --budget-s ${BUDGET:-160} \
      --out /tmp/kernels-moe-prefill.json --sweep-out "$OUT/kernels-moe-prefill-sweep.json" ;;
  ttft) sec ttft ${T_TTFT:-150} python3 bench/prefill.py --lens "${LENS:-930,931,1017,4096,8192}" \
      --profile 1024 --out "$OUT/prefill.json"
      ATOM_STREAM_MOE_ALIGN_PAR=0 ATOM_STREAM_MOE_CFG='{"BN2": 64}' sec ttft-old ${T_TTFT_OLD:-90} \
      python3 bench/prefill.py --lens 930,4096 --out "$OUT/prefill-old.json" ;;
  downladder) sec downladder-test ${T_TESTS:-90} $PY -m gpu tests/test_moe_down_ladder.py
      sec downladder ${T_LADDER:-200} python3 bench/moe_down_ladder.py --budget-s ${BUDGET:-150} \
      --out "$OUT/moe-down-ladder-h200.json" ;;
  pyt) sec pyt ${T_TESTS:-120} bash -c "$PY -m gpu $PYT" ;;  # PYT: pytest arguments, as typed
  topo) nvidia-smi topo -m > "$OUT/topo.txt" 2>&1; cat "$OUT/topo.txt" ;;
  prefix) sec prefix-tests ${T_TESTS:-200} $PY -m gpu tests/test_mla_prefix.py \
      tests/test_async_scheduling.py
      sec prefix ${T_PREFIX:-200} python3 bench/mla_prefix.py --out "$OUT/mla-prefix-h200.json" ;;
  allreduce) sec allreduce ${T_AR:-90} python3 bench/allreduce_tp.py --batches "${BATCHES:-1,16,64}" \
      --out "$OUT/allreduce-tp.json" ;;
  *) echo "unknown section $what" ;;
esac; done
