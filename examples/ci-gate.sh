#!/usr/bin/env bash
# CI gate: refuse a model that `cleanse scan` suspects of a backdoor.
#   examples/ci-gate.sh MODEL.safetensors CLEAN_DATA [extra scan options, e.g. --arch ... for a raw state dict]
# Exit 0: no backdoor found; 1: backdoor suspected (the suspected target and its reversed trigger are printed);
# 2: bad input. Needs: cleanse installed (see README), jq.
set -uo pipefail
model=${1:?usage: ci-gate.sh MODEL CLEAN_DATA [scan options]}
data=${2:?usage: ci-gate.sh MODEL CLEAN_DATA [scan options]}
shift 2
out=$(mktemp -d)/scan
cleanse scan "$model" --data "$data" --budget fast -o "$out" --json --quiet "$@" > verdict.json
code=$?
case $code in
  0) echo "PASS: no backdoor found in $model" ;;
  1) echo "FAIL: backdoor suspected in $model"
     jq -r '.classes[] | select(.flagged) | "  class \(.index) (\(.name)): flagged by \(.flagged_by | join(", "))"' verdict.json
     jq -r '.detectors | to_entries[] | .key as $d | .value.classes[] | select(.trigger_file)
            | "    \($d): size \(.statistic*100|round/100), anomaly index \(.anomaly_index*100|round/100), reversed-trigger ASR \(.attack_success_rate*100|round)%, \(.trigger_file)"' verdict.json
     echo "  reversed triggers and pictures in $out" ;;
  *) echo "ERROR: scan could not run (exit $code)"; exit "$code" ;;
esac
exit $code
