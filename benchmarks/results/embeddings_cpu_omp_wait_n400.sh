export PYTHONPATH=/work/wt/h4embed
M=~/.cache/soberana/real-models/hf/all-MiniLM-L6-v2
echo start $(date -u) $(cat /proc/loadavg)
run() {
  env $2 python -m soberana.cli serve $M --port 8123 --dtype $1 --disable-uvicorn-access-log > /tmp/h4e/serve.log 2>&1 &
  SP=$!
  for i in $(seq 120); do grep -q "ready: serving" /tmp/h4e/serve.log && break; sleep 1; done
  python /tmp/h4e/client.py 48 float >/dev/null
  echo "$1 $2 $(python /tmp/h4e/client.py 400 float) load $(cut -d' ' -f1 /proc/loadavg)"
  kill $SP; wait $SP
}
run float32 X=1; run float32 OMP_WAIT_POLICY=ACTIVE; run bfloat16 X=1; run bfloat16 OMP_WAIT_POLICY=ACTIVE
echo end $(date -u) $(cat /proc/loadavg)
