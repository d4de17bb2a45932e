#!/usr/bin/env bash
# Every unlearning recipe on the same clean subset, one comparison table and one checkpoint per recipe.
#   examples/compare-recipes.sh [MODEL TRIGGER DATA TEST]   (default: a backdoored model on the built-in data)
#   RANKS=4 examples/compare-recipes.sh ...   runs the recipes under torchrun, whole recipes per rank (docs/scaling.md)
# Needs: cleanse installed (see README), jq.
set -euo pipefail
out=compare-recipes
mkdir -p "$out"
if [ $# -eq 0 ]; then
    cleanse poison synthetic --attack badnets --target 0 --rate 0.1 -o "$out/poisoned.safetensors" --force --quiet
    cleanse train "$out/poisoned.safetensors" --epochs 8 -o "$out/model.safetensors" --force --quiet
    set -- "$out/model.safetensors" "$out/poisoned.trigger.safetensors" synthetic synthetic:test
fi
launch=(cleanse)
if [ "${RANKS:-1}" -gt 1 ]; then launch=(torchrun --standalone --nproc-per-node "$RANKS" -m cleanse); fi
"${launch[@]}" unlearn "$1" --method all --trigger "$2" --data "$3" --test "$4" --clean-frac 0.05 \
    -o "$out/cleaned.safetensors" --force --json > "$out/all.json"
jq -r '.recipes | to_entries[] | "\(.key)\tCA \(.value.after.clean_accuracy)\tASR \(.value.after.attack_success_rate)\tDER \(.value.der)\t\(.value.wall_seconds|round)s"' "$out/all.json"
cleanse report "$out" -o "$out/report" --force
echo "checkpoints: $out/cleaned.<recipe>.safetensors; report: $out/report/report.html"
