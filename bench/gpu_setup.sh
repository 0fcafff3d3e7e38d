# Sourced by the bench/gpu_*.sh device scripts: installs the carried cp312 wheels (.whl/) and this
# repo on the GPU machine, defines log(), and prints the versions it runs with.
set -u
export PYTHONUNBUFFERED=1
log() { echo "$(date +%T) $*" | tee -a "$OUT/log.txt"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
timeout 120 python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /tmp/pip.txt 2>&1
python3 -c "import torch, timm, google.protobuf, grpc; print('torch', torch.__version__, 'timm', timm.__version__, 'protobuf', google.protobuf.__version__, 'grpc', grpc.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$OUT/log.txt"
log installed
# The synthetic metal line: training split (seed 1) and held-out test split (seed 2) under $1.
synthetic_lines() {
  lineinspect synth --out "$1/metal1" --n 200 --seed 1 --surface metal > /dev/null &
  lineinspect synth --out "$1/metal2" --n 200 --seed 2 --surface metal > /dev/null &
  wait
}
