#!/usr/bin/env bash
# System packages the test suite needs beside the Python venv, from Debian's archive:
#   postgresql                 the shared Prefect server's database (infra test, started on loopback by the test)
#   chromium, chromium-driver  the headless browser test of the Prefect UI
# Installs only what is missing; needs root (or sudo). Exits 0 with a message when it cannot install,
# so that a developer without root still gets the rest of `make test` (those tests then say why they skip).
set -u

missing=()
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || missing+=(postgresql)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "system-deps: missing ${missing[*]} and no root to install them; their tests will be skipped" >&2
    exit 0
fi

echo "system-deps: installing ${missing[*]} from Debian's archive"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq || echo "system-deps: apt-get update failed" >&2
# --no-install-recommends keeps chromium to what headless use needs; postgresql's cluster is not started.
if ! $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
    echo "system-deps: apt-get install ${missing[*]} failed; their tests will be skipped" >&2
fi
exit 0
