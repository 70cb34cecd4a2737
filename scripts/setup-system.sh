#!/usr/bin/env bash
# System packages the figures need: Chromium renders PNGs through kaleido. Installed when we can (root + apt).
set -u
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || command -v google-chrome >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing Debian's chromium (PNG export of figures)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1; } \
    || echo "setup: could not install chromium; PNG export will fail until you install it (sudo apt-get install chromium)"
else
  echo "setup: PNG export of figures needs Chromium: sudo apt-get install chromium (or set BROWSER_PATH to a Chrome binary)"
fi
