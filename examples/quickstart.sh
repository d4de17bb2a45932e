#!/usr/bin/env bash
# Poison the built-in synthetic set, train a backdoored model, and look at it with Grad-CAM.
# Runs in about two minutes on 2 CPU cores. Needs: cleanse installed (see README), jq.
set -euo pipefail
out=${1:-quickstart-out}
mkdir -p "$out"
cleanse poison synthetic --attack badnets --target 0 --rate 0.1 -o "$out/poisoned.safetensors" --preview "$out/poison-preview.png" --force
cleanse train "$out/poisoned.safetensors" --epochs 8 --test synthetic:test \
    --trigger "$out/poisoned.trigger.safetensors" -o "$out/model.safetensors" --force --json > "$out/train.json"
jq '{clean_accuracy, attack_success_rate, robust_accuracy}' "$out/train.json"
cleanse explain "$out/model.safetensors" --data synthetic:test --trigger "$out/poisoned.trigger.safetensors" \
    --n 8 -o "$out/heatmaps" --force --json | jq '.set'
echo "look at $out/heatmaps/sheet.png: left the clean image and its map, right the triggered copy and its map"
