#!/bin/sh
# Regenerates the seeds of corpus/qcow2_image/: small qcow2 images made by qemu-img (4K or
# 512-byte clusters) and damaged copies. Needs qemu-img, qemu-io and python3.
set -eu
mkdir -p "$(dirname "$0")/corpus/qcow2_image"
cd "$(dirname "$0")/corpus/qcow2_image"
poke() { python3 -c 'import sys,struct;f=open(sys.argv[1],"r+b");f.seek(int(sys.argv[2],0));f.write(struct.pack(">"+sys.argv[4],int(sys.argv[3],0)))' "$@"; }
o="cluster_size=4096"
qemu-img create -q -f raw src.raw 256k
qemu-io -f raw -c 'write -P 0x11 0 40k' -c 'write -P 0x22 100k 4k' src.raw >/dev/null
qemu-img convert -c -O qcow2 -o $o src.raw qemu-compressed
qemu-img convert -O qcow2 -o $o,compat=0.10 src.raw qemu-v2
qemu-img create -q -f qcow2 -o $o -b src.raw -F raw qemu-over-raw
qemu-io -f qcow2 -c 'write -P 0x33 0 4k' -c 'write -z 8k 8k' -c 'write -P 0x44 200k 1k' qemu-over-raw >/dev/null
qemu-img create -q -f qcow2 -o cluster_size=512 qemu-512 64k
qemu-io -f qcow2 -c 'write -P 0x55 1000 3000' qemu-512 >/dev/null
qemu-img create -q -f qcow2 -o $o,data_file=src.data qemu-data-file 256k
qemu-io -f qcow2 -c 'write -P 0x66 0 8k' qemu-data-file >/dev/null
qemu-img create -q -f qcow2 -o $o,compression_type=zstd qemu-zstd 256k
rm -f src.raw src.data
# Damage, on copies of qemu-compressed and qemu-over-raw (header fields are big-endian).
cp qemu-compressed damaged-huge-size && poke damaged-huge-size 24 0x4000000000000 Q
cp qemu-compressed damaged-huge-l1 && poke damaged-huge-l1 36 0xffffffff I
cp qemu-compressed damaged-l1-unaligned && poke damaged-l1-unaligned 40 0x3001 Q
cp qemu-compressed damaged-encrypted && poke damaged-encrypted 32 2 I
cp qemu-compressed damaged-cluster-bits && poke damaged-cluster-bits 20 40 I
cp qemu-compressed damaged-version && poke damaged-version 4 4 I
cp qemu-compressed damaged-header-length && poke damaged-header-length 100 0xffffff I
cp qemu-over-raw damaged-backing-name && poke damaged-backing-name 16 0xffff I
cp qemu-over-raw damaged-l2-past-eof && poke damaged-l2-past-eof 0x3000 0x8000000000100000 Q
head -c 100 qemu-compressed > damaged-truncated-header
