#!/bin/sh
# Container entrypoint: with BERTSWARM_JOIN_FILE set (and no BERTSWARM_JOIN), wait for the bootstrap peer to write
# its join address there (bertswarm-peer --address-file), then join through it. Everything else passes through.
set -eu
if [ -n "${BERTSWARM_JOIN_FILE:-}" ] && [ -z "${BERTSWARM_JOIN:-}" ]; then
    waited=0
    limit="${BERTSWARM_JOIN_WAIT:-300}"
    while [ ! -s "$BERTSWARM_JOIN_FILE" ]; do
        if [ "$waited" -ge "$limit" ]; then
            echo "bertswarm: no join address appeared in $BERTSWARM_JOIN_FILE within ${limit}s; is the bootstrap peer running?" >&2
            exit 2
        fi
        sleep 1
        waited=$((waited + 1))
    done
    BERTSWARM_JOIN="$(cat "$BERTSWARM_JOIN_FILE")"
    export BERTSWARM_JOIN
fi
exec "$@"
