#!/usr/bin/env bash
# Debian's Chromium: the browser the web page's test drives (tests/integration/test_web.py, through Playwright
# pointed at the system binary; Playwright's own browser download is not used). Quiet when Chromium is there.
# `make setup` runs it; the test runs it once more before it gives up on a missing browser.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "chromium is missing and this is not a Debian-like system: install Chromium to run the browser test" >&2
    exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "chromium is missing; install it as root: apt-get install chromium" >&2
        exit 1
    fi
    sudo="sudo -n"
fi
echo "== installing Chromium (Debian package) for the browser test"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
command -v chromium >/dev/null 2>&1
