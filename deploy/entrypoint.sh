#!/bin/sh
# Container entrypoint: optionally fetch missing weights into the /weights volume, then run
# `python -m service <command>`. Any other command (bash, python ...) is run as given.
#
# COLORIZE_FETCH_WEIGHTS (read here only):
#   never (default)  never download; a missing file makes the service exit with a message naming it
#   auto             for a process that loads the model (worker; serve with COLORIZE_QUEUE=memory),
#                    run `fetch-weights` into COLORIZE_WEIGHTS_DIR when files are missing. Replicas
#                    starting together take a lock on the volume, so only one downloads. A failed
#                    download (no network) is reported and the service then starts and exits with
#                    its own message naming the missing files.
set -eu

command="${1:-serve}"
case "$command" in
    serve | worker | colorize | fetch-weights) ;;
    -*) set -- serve "$@"; command=serve ;;
    *) exec "$@" ;;
esac

loads_model() {
    [ "$command" = worker ] || { [ "$command" = serve ] && [ "${COLORIZE_QUEUE:-memory}" = memory ]; }
}

weights_complete() {
    python - <<'PY'
import sys

from service.settings import ModelSettings

missing = ModelSettings().missing_weight_files()
for path in missing:
    print(f"entrypoint: missing weight file {path}", file=sys.stderr)
sys.exit(1 if missing else 0)
PY
}

fetch_weights() {
    dir="${COLORIZE_WEIGHTS_DIR:-/weights}"
    if ! [ -w "$dir" ]; then
        echo "entrypoint: $dir is not writable (read-only mount?); not fetching weights" >&2
        return 0
    fi
    if command -v flock >/dev/null 2>&1; then
        # Replicas starting together: one downloads, the others wait, then find the files there.
        exec 9>"$dir/.fetch-weights.lock"
        flock 9
    fi
    if ! weights_complete 2>/dev/null; then
        detector="${COLORIZE_DETECTOR_VERSION:-v1}"
        case "$(printf '%s' "${COLORIZE_DETECTOR:-true}" | tr '[:upper:]' '[:lower:]')" in
            false | 0 | no | off) detector=none ;;
        esac
        echo "entrypoint: fetching weights into $dir (detector: $detector)" >&2
        python -m service fetch-weights --dir "$dir" --detector "$detector" --no-progress \
            || echo "entrypoint: fetch-weights failed (no network?); starting anyway" >&2
    fi
    if command -v flock >/dev/null 2>&1; then
        flock -u 9
        exec 9>&-
    fi
}

case "${COLORIZE_FETCH_WEIGHTS:-never}" in
    never) ;;
    auto)
        if loads_model && ! weights_complete; then
            fetch_weights
        fi
        ;;
    *)
        echo "entrypoint: COLORIZE_FETCH_WEIGHTS must be auto or never, got '${COLORIZE_FETCH_WEIGHTS}'" >&2
        exit 2
        ;;
esac

exec python -m service "$@"
