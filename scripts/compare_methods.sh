#!/usr/bin/env bash
# Train and score every method x rank x training split, plus a rank sweep, with run.sh
# stages 3-5 on the same data, seed and settings, then write exp/<corpus>/RESULTS.md with
# sparlora.compare.
set -euo pipefail
caller_dir=$(pwd)
command_line="bash scripts/compare_methods.sh $(printf '%q ' "$@")"
cd "$(dirname "$0")/.."

config=conf/demo.yaml
methods="lora sparlora_dft sparlora_phase sparlora sparlora_random pissa olora dora adalora full"
ranks=32
sweep_methods=sparlora
sweep_ranks="8 16 32"
train_splits=""
reference_method=lora
target_dev_cer=""
skip_setup=false

help_message="Usage: bash scripts/compare_methods.sh [options] [hydra overrides...]

Runs run.sh stages 3-5 once per method, rank and training split, and once per
sweep method and sweep rank (a run already in the first set is not repeated), with the tag
<method>_r<rank> (and _<split> for a split other than the config's corpus.train_split),
then writes <exp_root>/RESULTS.md and its figures from every finished run folder of
<exp_root>. A run whose previous command was the same and whose decodes all exist is
skipped; an unfinished one resumes from its last checkpoint. Stages 0-2 run first when
the config's prepared data is missing. Each run's console output goes to
<exp_root>/<tag>/run.log.

Options:
  --config FILE             recipe config (default: $config)
  --methods LIST            method configs of conf/method, space separated
                            (default: \"$methods\")
  --ranks LIST              ranks, space separated (default: \"$ranks\"); ignored for 'full'.
                            The dev CER figure and the ablation table use the config's
                            method.rank when it is listed, else the first rank listed
  --sweep-methods LIST      methods that also run at every rank of --sweep-ranks, for
                            the CER-against-rank figure (default: \"$sweep_methods\";
                            \"\" for none)
  --sweep-ranks LIST        ranks of the sweep (default: \"$sweep_ranks\")
  --train-splits LIST       prepared training splits, e.g. \"train_10h train\"
                            (default: the config's corpus.train_split)
  --reference-method NAME   method the others are compared with (default: $reference_method)
  --target-dev-cer PERCENT  dev CER for the convergence column (default: the
                            reference run's final dev CER)
  --skip-setup BOOL         true: do not check or install the environment (default: $skip_setup)

Hydra overrides after the options go to every run, for example train.epochs=10."

. scripts/parse_options.sh
overrides=("$@")

if [ ! -f "$config" ] && [ -f "$caller_dir/$config" ]; then
  config="$caller_dir/$config"
fi
if [ ! -f "$config" ]; then
  echo "$0: config file not found: $config" >&2
  exit 1
fi

for rank in $ranks $sweep_ranks; do
  if ! [[ $rank =~ ^[1-9][0-9]*$ ]]; then
    echo "$0: invalid rank '$rank' in --ranks or --sweep-ranks: expected a whole number of 1 or more, without leading zeros" >&2
    exit 1
  fi
done
ranked_methods=$(printf '%s\n' $methods | grep -vx full || true)
if [ -n "$ranked_methods" ] && [ -z "${ranks// /}" ]; then
  echo "$0: --ranks is empty; give the ranks of --methods, e.g. --ranks \"16 32\"" >&2
  exit 1
fi
for method in $methods $sweep_methods; do
  if ! [[ $method =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]*$ ]]; then
    echo "$0: invalid method name '$method': expected the name of a file in conf/method without .yaml" >&2
    exit 1
  fi
  if [ ! -f "conf/method/$method.yaml" ]; then
    echo "$0: unknown method '$method': conf/method/$method.yaml not found; available:" \
      "$(cd conf/method && ls -- *.yaml | sed 's/\.yaml$//' | tr '\n' ' ')" >&2
    exit 1
  fi
done

# The runs as method:rank pairs, in order and each once. 'full' trains every weight and has no rank.
runs=()
add_run() {
  local run=$1:$2 known
  for known in ${runs[@]+"${runs[@]}"}; do
    [ "$known" = "$run" ] && return
  done
  runs+=("$run")
}
for method in $methods; do
  if [ "$method" = full ]; then add_run full 0; continue; fi
  for rank in $ranks; do add_run "$method" "$rank"; done
done
for method in $sweep_methods; do
  if [ "$method" = full ]; then add_run full 0; continue; fi
  for rank in $sweep_ranks; do add_run "$method" "$rank"; done
done
if [ ${#runs[@]} -eq 0 ]; then
  echo "$0: no runs: --methods and --sweep-methods are both empty" >&2
  exit 1
fi

log() { echo "$(date '+%Y-%m-%d %H:%M:%S') [compare_methods.sh] $*"; }

if [ "$skip_setup" != true ]; then
  scripts/setup_env.sh
fi
. ./path.sh

cfg() { python -m sparlora.config --config "$config" --get "$1" "${overrides[@]}"; }
data_dir=$(cfg data_dir)
exp_root=$(cfg exp_root)
main_split=$(cfg corpus.train_split)
config_rank=$(cfg method.rank)
dev_split=$(cfg corpus.dev_split)
# corpus.test_splits prints as a Python list, e.g. ['sc_test', 'cmn_test'].
test_splits=$(cfg corpus.test_splits | tr -d "[],'")
train_splits=${train_splits:-$main_split}

needed=("$main_split" $test_splits)
[ "$dev_split" != None ] && needed+=("$dev_split")
for split in "${needed[@]}"; do
  if [ ! -f "$data_dir/$split/data.jsonl" ]; then
    log "prepared data missing ($data_dir/$split/data.jsonl): running stages 0-2"
    bash run.sh --skip-setup true --config "$config" --stage 0 --stop-stage 2 "${overrides[@]}"
    break
  fi
done
for split in $train_splits; do
  if [ ! -f "$data_dir/$split/data.jsonl" ]; then
    echo "$0: training split $split not prepared: $data_dir/$split/data.jsonl not found" >&2
    exit 1
  fi
done

decodes_complete() {
  local exp_dir=$1 split
  for split in $test_splits; do
    [ -f "$exp_dir/decode_$split/hyp" ] || return 1
  done
}

failed=()
start_all=$(date +%s)
for split in $train_splits; do
  for run in "${runs[@]}"; do
    method=${run%%:*} rank=${run##*:}
    tag=${method}_r${rank}
    [ "$split" != "$main_split" ] && tag=${tag}_${split}
    exp_dir=$exp_root/$tag
    run_overrides=("method=$method")
    [ "$method" != full ] && run_overrides+=("method.rank=$rank")
    run_overrides+=("tag=$tag" "corpus.train_split=$split" "${overrides[@]}")
    marker=$exp_dir/.compare_done
    signature=$(printf '%q ' "$config" "${run_overrides[@]}")

    first_stage=3
    if [ -f "$marker" ] && [ "$(cat "$marker")" = "$signature" ]; then
      if decodes_complete "$exp_dir"; then
        log "$tag: finished earlier, skipped"
        continue
      fi
      first_stage=4
    fi

    mkdir -p "$exp_dir"
    log "$tag: stages $first_stage-5 (log: $exp_dir/run.log)"
    start=$(date +%s)
    if bash run.sh --skip-setup true --config "$config" --stage "$first_stage" --stop-stage 5 \
        "${run_overrides[@]}" >> "$exp_dir/run.log" 2>&1; then
      printf '%s' "$signature" > "$marker"
      log "$tag: done in $(( $(date +%s) - start )) s"
    else
      log "$tag: FAILED after $(( $(date +%s) - start )) s; last lines of $exp_dir/run.log:"
      tail -n 5 "$exp_dir/run.log" >&2
      failed+=("$tag")
    fi
  done
done

# The dev CER figure and the ablation table use one rank: the config's method.rank when
# it is among --ranks, else the first rank of --ranks, or of --sweep-ranks when --ranks is empty.
main_rank=""
for rank in $ranks $sweep_ranks; do
  [ -z "$main_rank" ] && main_rank=$rank
done
for rank in $ranks; do
  [ "$rank" = "$config_rank" ] && main_rank=$rank
done
compare_args=(--config "$config" --reference-method "$reference_method" --main-rank "$main_rank"
              --out "$exp_root/RESULTS.md" --command "${command_line% }")
[ -n "$target_dev_cer" ] && compare_args+=(--target-dev-cer "$target_dev_cer")
if ! python -m sparlora.compare "${compare_args[@]}" "${overrides[@]}"; then
  echo "$0: writing $exp_root/RESULTS.md failed (see the error above); a RESULTS.md there is from an earlier call" >&2
  [ ${#failed[@]} -gt 0 ] && echo "$0: ${#failed[@]} run(s) failed: ${failed[*]}; see their run.log" >&2
  exit 1
fi
log "runs finished in $(( $(date +%s) - start_all )) s; results: $exp_root/RESULTS.md"

if [ ${#failed[@]} -gt 0 ]; then
  echo "$0: ${#failed[@]} run(s) failed: ${failed[*]}; see their run.log" >&2
  exit 1
fi
