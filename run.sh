#!/usr/bin/env bash
# Adapt a pretrained FunASR Paraformer to a Chinese dialect with SPaRLoRA.
# With no options it runs every stage on the built-in demo corpus.
set -euo pipefail
caller_dir=$(pwd)
cd "$(dirname "$0")"

stage=0
stop_stage=5
config=conf/demo.yaml
skip_setup=false
nproc=1

help_message="Usage: bash run.sh [options] [hydra overrides...]

Stages:
  0  corpus -> Kaldi-style data dirs per split, audio checked (data/<corpus>/<split>/)
     (the demo corpus is synthesized first if it is missing)
  1  text normalization, raw text kept in text.raw, OOV report in oov.txt
  2  pretrained Paraformer located (ModelScope id or local dir), jsonl manifests
  3  adapters injected, training with dev CER each epoch (exp/<corpus>/<tag>/)
  4  decoding of the test sets with the base model and the fine-tuned model
  5  CER scoring with S/D/I counts, RESULTS.md

Options:
  --stage N         first stage to run (default: $stage)
  --stop-stage M    last stage to run (default: $stop_stage)
  --config FILE     recipe config (default: $config); it may sit anywhere and use the
                    method/ configs of conf/
  --skip-setup BOOL true: do not check or install the environment (default: $skip_setup)
  --nproc N         processes for stage 3 on this machine (default: $nproc); N > 1 trains
                    with DDP through torchrun (gloo on CPU, one GPU each with NCCL); on CPU
                    set train.num_threads to cores / N

Hydra overrides after the options change any config value, for example:
  bash run.sh --stage 3 method.rank=8 train.epochs=2
  bash run.sh --stage 3 method=lora
Every stage reruns alone from what the earlier stages wrote."

. scripts/parse_options.sh
overrides=("$@")

for option in stage stop_stage; do
  if ! [[ "${!option}" =~ ^[0-5]$ ]]; then
    echo "$0: invalid --${option//_/-} '${!option}': expected a stage number from 0 to 5" >&2
    exit 1
  fi
done
if ! [[ "$nproc" =~ ^[1-9][0-9]*$ ]]; then
  echo "$0: invalid --nproc '$nproc': expected a positive integer" >&2
  exit 1
fi
if [ "$stage" -gt "$stop_stage" ]; then
  echo "$0: --stage $stage is after --stop-stage $stop_stage; nothing to run" >&2
  exit 1
fi
# A relative --config is taken from the folder run.sh was called from, or else from here.
if [ ! -f "$config" ] && [ -f "$caller_dir/$config" ]; then
  config="$caller_dir/$config"
fi
if [ ! -f "$config" ]; then
  echo "$0: config file not found: $config" >&2
  exit 1
fi

log() { echo "$(date '+%Y-%m-%d %H:%M:%S') [run.sh] $*"; }

if [ "$skip_setup" != true ]; then
  scripts/setup_env.sh
fi
. ./path.sh

cfg() { python -m sparlora.config --config "$config" --get "$1" "${overrides[@]}"; }
run_start=$(date +%s)

run_stage() {
  local number=$1 description=$2
  shift 2
  if [ "$stage" -le "$number" ] && [ "$stop_stage" -ge "$number" ]; then
    log "Stage $number: $description"
    local start
    start=$(date +%s)
    "$@"
    log "Stage $number done in $(( $(date +%s) - start )) s"
  fi
}

# make_once DIR_KEY CMD_KEY WHAT: run the config's CMD_KEY command unless DIR_KEY's folder
# has a .complete marker (a corpus or noise set that the recipe can make itself).
make_once() {
  local dir make_cmd
  dir=$(cfg "$1")
  make_cmd=$(cfg "$2")
  if [ "$make_cmd" != None ] && [ ! -e "$dir/.complete" ]; then
    log "creating the $3 in $dir: $make_cmd"
    bash -c "$make_cmd"
    touch "$dir/.complete"
  fi
}

stage0() {
  make_once corpus.source_dir corpus.make_cmd corpus
  python -m sparlora.prepare --config "$config" "${overrides[@]}"
  # Speaker-disjoint splits and duration subsets (corpus.speaker_split, corpus.subsets).
  python -m sparlora.splits --config "$config" "${overrides[@]}"
  # Noisy copies of test sets (noise.test), after making the noise set if it has a make_cmd.
  make_once noise.dir noise.make_cmd "noise set"
  python -m sparlora.noise --config "$config" "${overrides[@]}"
}

run_stage 0 "data preparation" stage0
run_stage 1 "text normalization" python -m sparlora.text --config "$config" "${overrides[@]}"
run_stage 2 "pretrained model and manifests" python -m sparlora.manifest --config "$config" "${overrides[@]}"
train_cmd=(python -m sparlora.train)
if [ "$nproc" -gt 1 ]; then
  train_cmd=(torchrun --standalone --nproc_per_node "$nproc" -m sparlora.train)
fi
run_stage 3 "training" "${train_cmd[@]}" --config "$config" "${overrides[@]}"
run_stage 4 "decoding" python -m sparlora.decode --config "$config" "${overrides[@]}"
run_stage 5 "scoring" python -m sparlora.score --config "$config" "${overrides[@]}"

log "finished stages $stage-$stop_stage in $(( $(date +%s) - run_start )) s"
