#!/bin/sh
# Writes a corpus of N small messages (default 100000) for measuring `luamilter replay`:
# a directory of .eml files, 1000 per subdirectory, each with a Received header (the client),
# Return-Path and To (the envelope); and examples/replay-new.toml (delete it after),
# the stock pack with one more keyword, so that 1 message in 10,000 changes.
# Usage, from the repository root:
#   benches/replay-corpus.sh /tmp/corpus 100000
#   /usr/bin/time -v target/release/luamilter replay /tmp/corpus \
#       --config examples/replay-new.toml --against examples/stock-pack.toml \
#       --store empty --dns-zone benches/replay-empty.zone
#   rm examples/replay-new.toml
set -eu
dir=$1
n=${2:-100000}
mkdir -p "$dir"
awk -v dir="$dir" -v n="$n" 'BEGIN {
  for (i = 0; i < n; i++) {
    sub_ = sprintf("%s/%03d", dir, int(i / 1000))
    if (i % 1000 == 0) system("mkdir -p " sub_)
    f = sprintf("%s/%06d.eml", sub_, i)
    ip = sprintf("198.51.%d.%d", int(i / 250) % 256, i % 250 + 1)
    printf "Received: from mail%d.sender%d.example (mail%d.sender%d.example [%s])\n", i, i % 97, i, i % 97, ip > f
    printf "\tby mx.example.org (Postfix) with ESMTP id Q%06d; Mon, 1 Jan 2024 10:00:00 +0000\n", i > f
    printf "Return-Path: <user%d@sender%d.example>\n", i, i % 97 > f
    printf "From: User %d <user%d@sender%d.example>\n", i, i, i % 97 > f
    printf "To: <rcpt%d@example.org>\n", i % 50 > f
    printf "Subject: message %d\n", i > f
    printf "Message-ID: <m%d@sender%d.example>\n", i, i % 97 > f
    printf "Date: Mon, 1 Jan 2024 10:00:00 +0000\n\n" > f
    printf "Hello,\n\nthis is message number %d of a generated replay corpus.\n\n-- \nUser %d\n", i, i > f
    close(f)
  }
}'
# The new configuration must sit beside the stock pack (its paths are relative to its file).
sed 's/^from_words = \["Detox"\]/from_words = ["Detox", "User 4242"]/' \
    examples/stock-pack.toml > examples/replay-new.toml
echo "$n messages in $dir; the new configuration in examples/replay-new.toml"
