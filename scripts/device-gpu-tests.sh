#!/usr/bin/env bash
# Run the nox `gpu` session on a CUDA machine that already has torch and triton and no network
# (the lent device machine, for example). Arguments are passed to pytest.
#
# nox itself may be missing there: carry its wheels in .whl/ (see README, "GPU tests") and this
# script installs them into a temporary folder, offline, before it runs the session.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! python3 -c "import nox" 2>/dev/null; then
    if compgen -G ".whl/nox-*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/nox-site .whl/*.whl
        export PYTHONPATH="/tmp/nox-site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "nox is not installed and no wheels were found in .whl/" >&2
        exit 2
    fi
fi
exec python3 -m nox -s gpu -- "$@"
