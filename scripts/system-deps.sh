#!/usr/bin/env bash
# Debian packages the full test suite uses: chromium (browser tests through Playwright, no browser
# download) and postgresql (the catalogue's PostgreSQL path). Installed only when missing and when
# we may (root with apt-get); otherwise those tests skip with a reason.
set -uo pipefail
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "[system-deps] missing ${need[*]}; the tests that need them will be skipped" >&2
  exit 0
fi
echo "[system-deps] installing ${need[*]} (Debian packages)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null 2>&1 || true
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1 \
  || echo "[system-deps] could not install ${need[*]}; those tests will be skipped" >&2
exit 0
