#!/usr/bin/env bash
# Installs the Debian packages the test suite drives, when they are missing:
#   chromium    the real browser of the end-to-end tests (Playwright drives /usr/bin/chromium;
#               Playwright's own browser download does not work offline)
#   postgresql  the server binaries; the tests start a throwaway server of their own (tests/pg.py)
#   iproute2    `ss`, with which a test checks the addresses the server listens on
# Called by `make test` and by .ci/run. Needs root (or sudo) only when something is missing.
set -euo pipefail
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
command -v ss >/dev/null || missing+=(iproute2)
[ ${#missing[@]} -eq 0 ] && exit 0

echo "Installing Debian packages for the tests: ${missing[*]}" >&2
as_root=()
if [ "$(id -u)" != 0 ]; then
    if ! command -v sudo >/dev/null; then
        echo "error: the tests need Debian's ${missing[*]}; run as root: apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
    as_root=(sudo)
fi
"${as_root[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
