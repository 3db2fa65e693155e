#!/usr/bin/env bash
# The recipe at the paper's shapes on one GPU, beside the reference anchor, in one device call.
#
# Prepare once, on the development machine (the GPU image has torch/transformers/peft/lightning but
# neither diffusers, webdataset nor hydra, and reaches no registry):
#   mkdir -p .bench && cp -r ../shared/bench/* .bench/ && echo .bench >> .git/info/exclude
#   pip download --no-deps -d .bench/wheels diffusers==0.42.1 webdataset braceexpand hydra-core omegaconf \
#       antlr4-python3-runtime==4.9.3 pycocoevalcap
# then run with the device tool: command "bash experiments/bench_gpu.sh", carry [".bench"].
# TINY=1 bash experiments/bench_gpu.sh checks the whole script on a CPU in a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
TINY=${TINY:-0}
flag=""
[ "$TINY" = 1 ] && flag="--tiny"
if [ -d .bench/wheels ] && ! python3 -c "import diffusers, webdataset, hydra" 2>/dev/null; then
  python3 -m pip install -q --no-deps --no-index --target .bench/site .bench/wheels/*
  export PYTHONPATH="$PWD/.bench/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU: CPU run"

echo "== reference anchor (diffusers UniDiffuserModel, transformers + peft)"
python3 .bench/gpu_anchor.py $flag | tee "$OUT/anchor.json"

echo "== BiDiffuser: U-ViT training step and i2t extraction (ours vs diffusers, same process)"
python3 experiments/bench_uvit.py $flag --precision autocast bf16 | tee "$OUT/uvit.txt"

echo "== LLM: alignment and LoRA steps (ours vs the reference configuration, same process)"
python3 experiments/bench_llm.py $flag | tee "$OUT/llm.txt"

echo "== the recipe's stages through run.py at the paper's shapes (model=random), a few steps each"
if [ "$TINY" = 1 ]; then model=(model=tiny); else model=(model=random trainer=gpu "data.synthetic.image_size=512"); fi
common=("${model[@]}" logger=csv "paths.data_dir=$OUT/data" "paths.log_dir=$OUT/logs" data.synthetic.n=160
        data.batch_size=8 data.eval_batch_size=8)
train=(callbacks.caption_eval=null stage.monitor=train/loss stage.monitor_mode=min trainer.max_steps=10)
for stage in bidiffuser pretrain; do
  python3 run.py "stage=$stage" "${common[@]}" "${train[@]}" "hydra.run.dir=$OUT/$stage" 2>&1 \
    | grep -E "perf/|train/loss|finished|error" || true
done
python3 run.py stage=extract "${common[@]}" "stage.splits=[val]" "hydra.run.dir=$OUT/extract" 2>&1 \
  | grep -E "extract/|finished|error" || true
echo "outputs in $OUT"
