#!/usr/bin/env bash
# CI services for `make test`: a one-node Slurm on localhost (slurm-wlm + munge), shellcheck and
# headless Chromium (TensorBoard screenshot test), installed from Debian when missing. Called by .ci/run before `make test`; tests/test_slurm.py
# uses them and, with TITAN_RW_REQUIRE_SLURM=1, fails rather than skips when they are absent.
# Stop them afterwards with launch/slurm_local_stop.sh (by the PIDs recorded here).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "[ci_services] not root: cannot install/start Slurm; the Slurm tests will skip (or fail if required)" >&2
  exit 0
fi
missing=()
command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)  # tests/test_two_hosts.py: ip netns, veth
[ -x /usr/bin/chromium ] || missing+=(chromium fonts-dejavu-core)
if [ ${#missing[@]} -gt 0 ]; then
  echo "[ci_services] installing ${missing[*]} (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
bash launch/slurm_local.sh
