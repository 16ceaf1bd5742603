#!/usr/bin/env bash
# The main job on its embedded default: set up .venv if needed, get Fashion-MNIST, train a small ConvNeXt-dcls on
# it (CPU is fine), evaluate, and say where the logs and checkpoints are. Extra arguments go to train.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV=${VENV:-.venv}
DEB_DIR=/usr/share/datasets/fashion-mnist
extra=()
if [ ! -d "$DEB_DIR" ] && [ ! -f data/FashionMNIST/raw/train-images-idx3-ubyte ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "[quickstart] installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
        { apt-get install -y -qq dataset-fashion-mnist || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }; } \
            >/dev/null 2>&1 || true
    fi
    if [ ! -d "$DEB_DIR" ]; then
        echo "[quickstart] Debian package not available: torchvision will download Fashion-MNIST"
        extra+=(--dataset-download)
    fi
fi
start=$(date +%s)
"$VENV/bin/python" train.py -c configs/quickstart_fashion_mnist.yaml "${extra[@]}" "$@"
echo "[quickstart] finished in $(( $(date +%s) - start )) s"
"$VENV/bin/python" - <<'PY'
import json, glob, os
files = sorted(glob.glob('output/quickstart/*/results.json'), key=os.path.getmtime)
if files:
    r = json.load(open(files[-1]))
    e = r['eval']
    print(f"[quickstart] Fashion-MNIST test accuracy: {e.get('top1', float('nan')):.2f} % "
          f"(EMA {e.get('ema_top1', float('nan')):.2f} %)")
    print(f"[quickstart] checkpoints: {r['output_dir']}  |  tensorboard --logdir {r['output_dir']}/tensorboard")
PY
