#!/usr/bin/env bash
# Install the headless browser of the editor's browser test and screenshot tool (Debian's chromium and
# chromium-driver) when it is missing and this user can (root with apt-get, as on CI). Prints nothing
# when it is already there; never fails the caller: without a browser the test skips (or, on CI, fails
# saying why).
set -uo pipefail
have_browser() {
  command -v chromedriver >/dev/null 2>&1 && { command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; }
}
have_browser && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  exit 0
fi
echo "installing chromium and chromium-driver for the editor's browser test" >&2
log="$(mktemp)"
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } >"$log" 2>&1; then
  echo "warning: could not install chromium / chromium-driver:" >&2
  tail -n 3 "$log" >&2
fi
rm -f "$log"
exit 0
