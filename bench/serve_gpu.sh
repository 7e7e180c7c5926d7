#!/usr/bin/env bash
# One device call: serve a bench preset (default k25-tp8-rank: one Kimi-K2.5 TP8 rank, INT4
# experts, dummy weights, fp8 KV) with `atom-stream`'s OpenAI server and run the Kimi-K2.5 usage
# guide's benchmark command at concurrency 1, 4, 16, 64 (ISL/OSL 1024/1024, range ratio 0.8).
# Result JSONs and the server log go to $OUT/serving; plot them here with bench/plot.py.
#   PRESET=k25-tp8-rank PROMPTS_PER_CONC=10 CONCS="1 4 16 64" bash bench/serve_gpu.sh
# PROMPTS_PER_CONC is the guide's 10 (num_prompts = CONC * 10); lower it to fit a device call.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1
[ -e atom_stream/kernels ] || ln -s ../kernels atom_stream/kernels
OUT=${OUT:-/tmp/out}; R=$OUT/serving; mkdir -p "$R"
PRESET=${PRESET:-k25-tp8-rank}; ISL=${ISL:-1024}; OSL=${OSL:-1024}
PPC=${PROMPTS_PER_CONC:-10}; CONCS=${CONCS:-"1 4 16 64"}; PORT=${PORT:-8000}
MAXC=$(echo $CONCS | tr ' ' '\n' | sort -n | tail -1)
python3 -m atom_stream.entrypoints.openai_server --model "$PRESET" --load-format dummy \
    --kv_cache_dtype fp8 --max-num-seqs "$MAXC" --max-model-len $(( (ISL + OSL) * 2 )) \
    --server-port "$PORT" --disable-uvicorn-access-log ${SERVER_ARGS:-} > "$R/server.log" 2>&1 &
SERVER=$!
t0=$(date +%s)
until curl -sf "localhost:$PORT/health" > /dev/null; do
  if ! kill -0 $SERVER 2>/dev/null; then echo "server died"; tail -30 "$R/server.log"; exit 1; fi
  if (( $(date +%s) - t0 > ${START_TIMEOUT:-360} )); then echo "server not up"; tail -30 "$R/server.log"; kill $SERVER; exit 1; fi
  sleep 2
done
echo "server up after $(( $(date +%s) - t0 )) s"
for CONC in $CONCS; do
  python3 -m atom_stream.benchmarks.benchmark_serving \
      --model="$PRESET" --backend=vllm --base-url="http://localhost:$PORT" \
      --trust-remote-code --dataset-name=random \
      --random-input-len="$ISL" --random-output-len="$OSL" \
      --random-range-ratio 0.8 \
      --num-prompts=$(( CONC * PPC )) \
      --max-concurrency="$CONC" \
      --request-rate=inf --ignore-eos \
      --save-result --result-dir="$R" --result-filename="$PRESET-vllm-c$CONC.json" \
      --percentile-metrics="ttft,tpot,itl,e2el" --metric-percentiles=50,99 --disable-tqdm \
      --metadata num_prompts_per_conc=$PPC > "$R/bench-c$CONC.log" 2>&1
  grep -E "throughput|Median|P99|Successful|Failed|Duration" "$R/bench-c$CONC.log" \
      | sed "s/^/c=$CONC /" | tee -a "$R/summary.txt"
  grep -q "Successful" "$R/bench-c$CONC.log" || tail -20 "$R/bench-c$CONC.log"
done
curl -s "localhost:$PORT/metrics" | grep -E "^atom_stream:(num_preemptions|generation_tokens)" > "$R/metrics.txt"
kill -INT $SERVER; wait $SERVER
tail -5 "$R/server.log"
# kernels compiled on a request's path (engine/compile_watch.py): TTFT / ITL outliers
echo "Triton compiles after start-up: $(grep -c 'Triton compiled' "$R/server.log")" | tee -a "$R/summary.txt"
grep 'Triton compiled' "$R/server.log" | cut -c1-400 | head -20 | tee -a "$R/summary.txt"
