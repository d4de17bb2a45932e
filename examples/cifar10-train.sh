#!/usr/bin/env bash
# Real CIFAR-10 (ImageFolder of JPEGs at ../shared/datasets/cifar10): BadNets 10% poisoning,
# default cnn, about 13 minutes on 2 CPU cores. Usage: examples/cifar10-train.sh [CIFAR10_DIR] [OUT_DIR]
set -euo pipefail
cifar=${1:-../shared/datasets/cifar10}
out=${2:-cifar10-out}
mkdir -p "$out"
cleanse poison "$cifar/train" --attack badnets --target 0 --rate 0.1 -o "$out/badnets.safetensors" --force
cleanse train "$out/badnets.safetensors" --test "$cifar/test" --trigger "$out/badnets.trigger.safetensors" \
    -o "$out/cnn-badnets.safetensors" --force --json | tee "$out/train.json"
cleanse explain "$out/cnn-badnets.safetensors" --data "$cifar/test" --trigger "$out/badnets.trigger.safetensors" \
    --n 16 -o "$out/heatmaps" --force
