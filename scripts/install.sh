#!/usr/bin/env bash
# Everything kvmtest needs on a fresh Debian 12 machine; idempotent.
# As root it installs the Debian packages (toolchain, QEMU, busybox, kernel
# sources for module rebuilds); as a user it says which ones are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  gcc binutils linux-libc-dev              # cffi extension, guest payloads
  qemu-system-x86 busybox-static zstd      # qemu backend (zstd: zstd-packed modules)
  gcc-12 make patch git xz-utils           # kvmtest kmod build, bisect-run
  procps                                   # pgrep in the QEMU reaping tests
)
# The HTML report's tests (headless, over WebDriver); KVMTEST_NO_BROWSER=1
# leaves them out where only kvmtest itself runs (the CI matrix jobs).
[[ ${KVMTEST_NO_BROWSER:-0} == 1 ]] || APT_PACKAGES+=(chromium chromium-driver)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]]; then
    echo "install.sh: apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" >/dev/null
  else
    echo "install.sh: missing Debian packages (run as root or: sudo apt-get install ${missing[*]})" >&2
  fi
fi

PY=${PYTHON:-python3}
"$PY" -m pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v -e "Running pip as the 'root' user" -e "is ignored: it is neither" || true
"$PY" -c "import kvmtest._kvm_cffi, kvmtest.payloads as p; p.load_payload('vmrun')" \
  || { echo "install.sh: kvmtest did not install" >&2; exit 1; }
# pyenv (as on these machines) needs its shims refreshed for the new script.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
command -v kvmtest >/dev/null || echo "install.sh: 'kvmtest' is not on PATH; use '$PY -m kvmtest'" >&2
echo "install.sh: kvmtest $("$PY" -c 'import kvmtest; print(kvmtest.__version__)') ready"
