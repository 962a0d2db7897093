#!/usr/bin/env bash
# One device call: GPU tests of softmax-n, then the quick benchmark (upstream installed from .whl/ if carried).
set -x
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/flash_attention_softmax_n*.whl 2>&1 | tail -1
export PYTHONPATH=$(ls -d packages/*/src | tr '\n' ':')/tmp/site
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python3 -m pytest packages/softmax-n/tests -m "not interpret" -q --maxfail=20 -p no:cacheprovider 2>&1 | tail -25
timeout 150 python3 packages/softmax-n/benchmarks/bench_softmax_n.py --quick 2>&1 | tail -12
