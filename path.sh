# Sourced by run.sh and the tests: the project's virtualenv, PYTHONPATH and
# thread settings. Run scripts/setup_env.sh first (run.sh does it for you).
SPARLORA_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export SPARLORA_ROOT
export PATH="$SPARLORA_ROOT/.venv/bin:$PATH"
export PYTHONPATH="$SPARLORA_ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONIOENCODING=UTF-8
# One BLAS thread per process unless the user says otherwise; torch sets its own
# intra-op threads from the config (train.num_threads).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
# ModelScope downloads go to exp/ unless the user has a cache of their own.
export MODELSCOPE_CACHE=${MODELSCOPE_CACHE:-$SPARLORA_ROOT/exp/modelscope_cache}
