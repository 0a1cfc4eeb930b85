#!/usr/bin/env bash
# Installs the system packages the test suite drives for real: Postfix and swaks (end-to-end
# tests), redis-server (shared-store tests, Sentinel too), openssl (certificates for the Redis
# TLS tests), man-db and groff (`man -l` on the generated pages), zsh and fish (the generated
# shell completions, completing), lintian (the Debian package, .ci/deb), dkimpy with PyNaCl,
# dnspython and authres (DKIM and ARC tests: the second implementation, signing and sealing for
# luamilter to verify, and verifying what luamilter signs), and python3-flufl.bounce for its
# corpus of real-world bounces (the srs policy's delayed-failure tests), and e2fsprogs (an ext4
# loop disk that dies under the store). Idempotent; needs root (as do the Postfix tests).
set -euo pipefail
missing=()
command -v postfix >/dev/null 2>&1 || [ -x /usr/sbin/postfix ] || missing+=(postfix)
command -v swaks >/dev/null 2>&1 || missing+=(swaks)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v man >/dev/null 2>&1 || missing+=(man-db)
command -v nroff >/dev/null 2>&1 || missing+=(groff-base)
command -v lintian >/dev/null 2>&1 || missing+=(lintian)
command -v zsh >/dev/null 2>&1 || missing+=(zsh)
command -v fish >/dev/null 2>&1 || missing+=(fish)
command -v dkimverify >/dev/null 2>&1 || missing+=(python3-dkim)
/usr/bin/python3 -c 'import nacl' >/dev/null 2>&1 || missing+=(python3-nacl)
/usr/bin/python3 -c 'import dns.resolver' >/dev/null 2>&1 || missing+=(python3-dnspython)
/usr/bin/python3 -c 'import authres' >/dev/null 2>&1 || missing+=(python3-authres)
[ -d /usr/lib/python3/dist-packages/flufl/bounce/tests/data ] || missing+=(python3-flufl.bounce)
command -v mkfs.ext4 >/dev/null 2>&1 || [ -x /usr/sbin/mkfs.ext4 ] || missing+=(e2fsprogs)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "tests/setup.sh: need root to install: ${missing[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# Postfix without a system configuration: the tests run private instances only.
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
apt-get install -y -q "${missing[@]}"
