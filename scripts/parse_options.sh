# Kaldi-style option parsing, sourced by run.sh after it sets its defaults.
# `--some-option VALUE` sets the shell variable some_option, which must already
# exist (so a typo is an error, not a silently ignored option). Parsing stops at the
# first argument that does not start with `--`; what is left stays in "$@" (run.sh
# passes it on as hydra overrides). `--help` prints $help_message and exits.

while [ $# -gt 0 ]; do
  case "$1" in
    --help|-h)
      echo "$help_message"
      exit 0
      ;;
    --*=*)
      echo "$0: write options as '--name value', not '$1'" >&2
      exit 1
      ;;
    --*)
      option_name=$(echo "${1#--}" | tr '-' '_')
      if [ -z "${!option_name+set}" ]; then
        echo "$0: invalid option $1 (see $0 --help)" >&2
        exit 1
      fi
      if [ $# -lt 2 ]; then
        echo "$0: option $1 needs a value" >&2
        exit 1
      fi
      printf -v "$option_name" '%s' "$2"
      shift 2
      ;;
    *)
      break
      ;;
  esac
done
