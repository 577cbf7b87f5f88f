#!/bin/sh
# Regenerates the QEMU-made and damaged seeds of corpus/qed_image/ (small: 4K clusters,
# tables of 2 clusters). Our own images come from `cargo run -p qedstream-fuzz --example
# make_corpus`. Needs qemu-img, qemu-io and python3.
set -eu
cd "$(dirname "$0")/corpus/qed_image"
poke() { python3 -c 'import sys,struct;f=open(sys.argv[1],"r+b");f.seek(int(sys.argv[2],0));f.write(struct.pack("<Q",int(sys.argv[3],0)))' "$@"; }
o="cluster_size=4096,table_size=2"
qemu-img create -q -f qed -o $o qemu-empty-1m 1M
qemu-img create -q -f qed -o $o qemu-writes-1m 1M
qemu-io -f qed -c 'write -P 0x11 1000 6000' -c 'write -z 16k 8k' -c 'write -P 0x22 900k 5k' qemu-writes-1m >/dev/null
: > base.raw
qemu-img create -q -f qed -o $o -b base.raw -F raw qemu-raw-backing-1m 1M
qemu-io -f qed -c 'write -P 0x33 0 4k' -c 'write -z 8k 4k' qemu-raw-backing-1m >/dev/null
rm base.raw
# Damage, on copies of qemu-writes-1m (L1 at 0x1000, data at 0x3000 and 0x4000, L2 at 0x5000).
cp qemu-writes-1m damaged-l2-past-eof && poke damaged-l2-past-eof 0x5000 0x1000000
cp qemu-writes-1m damaged-l2-duplicate && poke damaged-l2-duplicate 0x5008 0x3000
cp qemu-writes-1m damaged-l2-unaligned && poke damaged-l2-unaligned 0x5000 0x3800
cp qemu-writes-1m damaged-l2-into-header && poke damaged-l2-into-header 0x5000 0x0800
cp qemu-writes-1m damaged-l1-past-eof && poke damaged-l1-past-eof 0x1000 0x100000
cp qemu-writes-1m damaged-l1-self && poke damaged-l1-self 0x1000 0x1000
cp qemu-writes-1m damaged-unknown-feature && poke damaged-unknown-feature 16 0x8
cp qemu-writes-1m damaged-need-check && poke damaged-need-check 16 0x2
cp qemu-writes-1m damaged-huge-table-size && poke damaged-huge-table-size 8 0x100000001
cp qemu-writes-1m damaged-huge-size && poke damaged-huge-size 48 0xfffffffffffffe00
cp qemu-writes-1m damaged-backing-past-header && poke damaged-backing-past-header 16 0x1 && poke damaged-backing-past-header 56 0x0000100000000ff0
head -c 40 qemu-writes-1m > damaged-truncated-header
head -c 5000 qemu-writes-1m > damaged-truncated-l1
cp qemu-writes-1m damaged-leak && truncate -s +4096 damaged-leak
