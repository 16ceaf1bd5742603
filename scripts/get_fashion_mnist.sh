#!/usr/bin/env bash
# Fashion-MNIST for the quick start and the learning tests, best effort and never fatal: when the Debian package
# dataset-fashion-mnist (the four gzipped IDX files in /usr/share/datasets/fashion-mnist) is missing and we are root
# with apt-get, install it quietly. Without it, train.py needs --dataset-download (torchvision) and the tests look at
# $DCLS_TIMM_FASHION_MNIST, then try torchvision's download. Argument: the tag for its messages (default: data).
DEB_DIR=/usr/share/datasets/fashion-mnist
tag=${1:-data}
[ -d "$DEB_DIR" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[$tag] installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get install -y -qq dataset-fashion-mnist \
        || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }; } >/dev/null 2>&1
fi
[ -d "$DEB_DIR" ] \
    || echo "[$tag] Debian package dataset-fashion-mnist not installed (needs root, apt-get and a Debian archive)" >&2
exit 0
