#!/usr/bin/env bash
# Writes a starting corpus of random inputs into DIR (if it is empty), so a short CI run
# reaches the larger shapes at once instead of growing its inputs from nothing.
# Generated at run time, never committed. Usage: fuzz/seed.sh DIR [COUNT]
set -euo pipefail
dir=$1
count=${2:-48}
mkdir -p "$dir"
if [ -n "$(ls -A "$dir")" ]; then
    exit 0
fi
for i in $(seq 1 "$count"); do
    head -c $((32 + (i * 97) % 1500)) /dev/urandom >"$dir/seed-$i"
done
echo "seeded $dir with $count random inputs"
