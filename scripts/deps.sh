#!/usr/bin/env bash
# Install the Debian packages blockd's demo and tests use, only those missing.
# Services in these packages (unbound, named, pdns-recursor, kresd) are NOT started or enabled by the install:
# the tests start their own instances on loopback ports with configs they write.
set -euo pipefail
pkgs=(
  python3 python3-venv            # the .venv
  minisign                        # signature interop (both ways)
  nftables ipset iptables         # kernel enforcement and independent read-back
  iproute2 iputils-ping netcat-openbsd   # network namespaces, veth, probes
  bind9-dnsutils                  # dig (prints EDE)
  unbound bind9 dnsperf           # real RPZ secondaries and the DNS benchmark
  pdns-recursor knot-resolver     # RPZ consumers with EDE (PowerDNS) and file-loading (Knot) in e2e tests
  lua-cqueues                     # lets kresd watch and reload the zone file blockd writes
  prometheus                      # promtool, and a real scraper for the e2e test
  bird2                           # a real BGP router for the RTBH enforcer test and benchmark
  faketime                        # libfaketime: the wall clock stepped under a running daemon (tests)
  chromium                        # headless: renders the compliance HTML report in its test
  jq e2fsprogs coreutils          # docs/attestation.md's verification steps; chattr +i in tests
)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "deps.sh: need root to install: ${missing[*]}" >&2
  exit 1
fi
echo "deps.sh: installing ${missing[*]}"
# Keep maintainer scripts from starting daemons (unbound, named, prometheus) on the host.
policy=/usr/sbin/policy-rc.d
had_policy=0; [ -e "$policy" ] && had_policy=1
if [ $had_policy -eq 0 ]; then printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 755 "$policy"; fi
trap '[ $had_policy -eq 0 ] && rm -f "$policy"' EXIT
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
