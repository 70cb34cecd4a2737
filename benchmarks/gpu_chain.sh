#!/usr/bin/env bash
# `make figures PROFILE=gpu` on a GPU machine with no package registry (the lent H200), timed per notebook.
#   [CHAIN_TIMEOUT_S=540] [CHAIN_TOKENIZER=.tokens/pretrain/tokenizer.json] bash benchmarks/gpu_chain.sh WHEELS MODEL OUT
# WHEELS: a folder of the wheels the machine lacks (installed once into .gpu/site, next to its own torch);
# MODEL: an embedded alias, a folder, or `llama2-7b` (a random-weight LLaMA-2-7B saved once to .gpu/llama2-7b, with
# the BPE file CHAIN_TOKENIZER as its tokenizer if set, else the byte tokenizer);
# OUT: where make.log, gpumem.csv (nvidia-smi, 1 s) and chain.md (benchmarks/chain_report.py) go.
# A second call resumes: make skips finished notebooks and the studies reuse their cached artefacts. make is
# stopped CHAIN_TIMEOUT_S seconds after this script started (set-up and drawing the model count; default: no limit)
# so the report is still written inside a machine's call limit (a plain `timeout` around this script does not stop
# it: bash waits for make before it handles the signal).
set -euo pipefail
wheels=$1 model=$2 out=$3
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
G=$PWD/.gpu
export PYTHONPATH=$G/site JUPYTER_PATH=$G/share/jupyter:$G/site/share/jupyter  # the kernel spec; nbconvert templates
if [ ! -f $G/.setup-done ]; then
  python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --no-cache-dir --target $G/site "$wheels"/*.whl
  mkdir -p $G/bin && ln -sf $G/site/bin/* $G/bin/
  # a wrapper, not a link: a venv's python finds its site-packages only when called by its own path
  printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" > $G/bin/python && chmod +x $G/bin/python
  python3 -m ipykernel install --prefix $G --name babel --display-name babel >/dev/null
  touch $G/.setup-done
fi
if [ "$model" = llama2-7b ]; then
  if [ ! -f $G/llama2-7b/config.json ]; then
    drawn=$SECONDS; python3 -m babel_lib.core.tiny llama2-7b $G/llama2-7b --device cuda ${CHAIN_TOKENIZER:+--tokenizer "$CHAIN_TOKENIZER"}
    echo "random llama2-7b drawn and saved in $((SECONDS - drawn)) s" | tee -a "$out/make.log"
  fi
  model=$G/llama2-7b
fi
run=build/gpu-$(echo "$model" | tr '/:' '__')
# a warm machine's copy of the working tree is newer than the notebooks an earlier call executed: keep those
[ -d "$run" ] && find "$run" -maxdepth 1 -name '0*.ipynb' ! -name '*.tmp.ipynb' -exec touch {} +
nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader,nounits -lms 1000 >> "$out/gpumem.csv" &
status=0
limit=${CHAIN_TIMEOUT_S:+timeout -k 10 $((CHAIN_TIMEOUT_S - SECONDS))}
echo "make starts $SECONDS s after the script" >> "$out/make.log"
$limit make figures PROFILE=gpu MODEL="$model" VENV=.gpu -o .gpu/.setup-done -o models >> "$out/make.log" 2>&1 || status=$?
tail -n 20 "$out/make.log"
kill %1 || true
python3 benchmarks/chain_report.py "$run" "$out/gpumem.csv" | tee "$out/chain.md"
exit $status
