#!/usr/bin/env bash
# The GPU benchmarks in one command, for the first machine with an NVIDIA GPU:
#
#     bash bench/gpu.sh            # from the repository root; about 10-20 minutes
#
# Installs what the GPU needs (`make setup`: CUDA torch, faiss-gpu instead of faiss-cpu), then
# runs, each against its baseline in the same run:
#   embedding   bench/embedding.py --device cuda   (embed_pool in bf16 vs plain encode, float32)
#   forward     bench/forward_throughput.py --device cuda  (engine, padded batches of 16k tokens,
#               bf16, vs one-at-a-time; roofline = an 8192^3 bf16 GEMM on the same GPU)
#   k-means     bench/kmeans.py --gpu (faiss-gpu, 1M x 384 float16, k = 1000) vs scikit-learn
#   trainer     bench/trainer.py --device cuda (bf16 autocast both; thresher vs a plain loop)
#   less        bench/less_features.py --device cuda (LESS gradient features: packed bf16
#               per-sample gradients vs the float32 vmap path, seconds per row per checkpoint,
#               roofline fraction; needs the shared data, ../shared/data)
# and appends every figure, with the GPU's name and the commands, to bench/RESULTS.md
# (raw outputs in bench/out/gpu/).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "error: no NVIDIA GPU here (nvidia-smi -L failed); bench/gpu.sh needs one" >&2
    exit 2
fi
make setup
PY=.venv/bin/python
OUT=bench/out/gpu
mkdir -p "$OUT"
"$PY" -c 'import torch, faiss; assert torch.cuda.is_available(), "torch has no CUDA"; print("GPU:", torch.cuda.get_device_name(), "| faiss GPUs:", faiss.get_num_gpus())'

[ -f bench/out/scale/1000000/embeddings.npy ] || "$PY" bench/scale_data.py --rows 1000000

declare -A CMDS=(
    [embedding]="$PY bench/embedding.py --device cuda --rows 4000"
    [forward]="$PY bench/forward_throughput.py --device cuda --rows 256 --rounds 3 --padded"
    [kmeans]="$PY bench/kmeans.py --gpu --data bench/out/scale/1000000/embeddings.npy --k 1000"
    [trainer]="$PY bench/trainer.py --device cuda --rows 64 --max-tokens 512"
    [less]="$PY bench/less_features.py --device cuda --out bench/out/gpu/less-features --rows 256 --rounds 2"
)
NAMES="embedding forward kmeans trainer less"
for name in $NAMES; do
    echo "== $name: ${CMDS[$name]}"
    ${CMDS[$name]} 2>&1 | grep -v "Loading weights" | tee "$OUT/$name.txt"
done

{
    echo
    echo "## GPU run (\`bench/gpu.sh\`, $(date -u +%Y-%m-%d))"
    echo
    echo "Machine: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1);" \
         "$(nproc) CPU cores; $("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)')."
    for name in $NAMES; do
        echo
        echo "### $name"
        echo
        echo "Command: \`${CMDS[$name]#"$PY" }\`"
        echo
        echo '```'
        grep -v '^{' "$OUT/$name.txt" | tail -n 12
        echo '```'
    done
} >> bench/RESULTS.md
echo "appended the figures to bench/RESULTS.md (raw outputs in $OUT/)"
