#!/usr/bin/env bash
# Re-sign the shipped samples after editing them: the catalog and ASN table with the demo
# operator key (role catalog), the example policies with the demo regulator key (role policy).
set -euo pipefail
cd "$(dirname "$0")/.."
blockd=${BLOCKD:-.venv/bin/blockd}
$blockd sign --sec policies/keys/demo-operator.key policies/catalog/*.yaml policies/asn/prefix2as.txt >/dev/null
$blockd sign --sec policies/keys/demo-regulator.key policies/examples/*.yaml >/dev/null
$blockd verify --role catalog policies/catalog/*.yaml policies/asn/prefix2as.txt
$blockd verify --role policy policies/examples/*.yaml
