#!/usr/bin/env bash
# The main job on its embedded default: set up .venv if needed, get Fashion-MNIST, train a small ConvNeXt-dcls on
# it (CPU is fine), evaluate, and say where the logs and checkpoints are. Extra arguments go to train.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV=${VENV:-.venv}
extra=()
# data/FashionMNIST/raw (the config's data_dir; not in the repository): train.py unpacks the Debian package's files
# there, else torchvision downloads them
if [ ! -f data/FashionMNIST/raw/train-images-idx3-ubyte ]; then
    bash scripts/get_fashion_mnist.sh quickstart
    if [ ! -d /usr/share/datasets/fashion-mnist ]; then
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
