#!/usr/bin/env bash
# Builds (or finds cached) the qedstream test guest: an uncompressed Linux kernel and a busybox
# initramfs whose /init (guest/init) hashes the virtio disk /dev/vda. Prints the kit directory,
# which holds:
#   vmlinux              Debian's linux-image-amd64 kernel, the ELF inside the bzImage (boots
#                        through PVH with `qemu-system-x86_64 -kernel vmlinux`, much faster
#                        under TCG than the bzImage)
#   initramfs.cpio.gz    busybox-static, the virtio modules, /init
#   kernel-version       e.g. 6.1.0-57-amd64
#
# Nothing is installed: the packages are fetched with `apt-get download` and unpacked with
# `dpkg-deb`. The kit is cached under ${QEDSTREAM_GUEST_DIR:-$HOME/.cache/qedstream-guest}, keyed
# by the kernel version and a hash of guest/init and this script, so a second run only prints
# the directory. Needs apt's package lists (apt-get update) and the network on the first run.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${QEDSTREAM_GUEST_DIR:-${HOME:?HOME is unset}/.cache/qedstream-guest}

die() {
	echo "build-kit.sh: $*" >&2
	exit 1
}

for tool in apt-cache apt-get dpkg-deb xz gzip sha256sum od tar; do
	command -v "$tool" >/dev/null || die "needs $tool on PATH"
done

# linux-image-amd64 is a metapackage: the kernel is the versioned package it depends on.
kernel_pkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
	sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n 1)
[ -n "$kernel_pkg" ] ||
	die "apt knows no linux-image-amd64 (run apt-get update; .ci/run does)"
kernel_version=${kernel_pkg#linux-image-}

recipe=$(cat "$here/init" "$here/build-kit.sh" | sha256sum | cut -c 1-16)
kit="$cache/$kernel_version-$recipe"
if [ -f "$kit/vmlinux" ] && [ -f "$kit/initramfs.cpio.gz" ]; then
	echo "$kit"
	exit 0
fi

mkdir -p "$cache"
work=$(mktemp -d "$cache/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"

# apt-get download writes into the current directory; as root it warns that the _apt user
# cannot write here, which is harmless.
apt-get download -q=2 "$kernel_pkg" busybox-static >download.log 2>&1 ||
	die "apt-get download $kernel_pkg busybox-static failed (network?):
$(cat download.log)"

mkdir kernel busybox
dpkg-deb --fsys-tarfile "$kernel_pkg"_*.deb |
	tar -x -C kernel --wildcards "./boot/vmlinuz-$kernel_version" \
		"./lib/modules/$kernel_version/kernel/drivers/virtio/*.ko" \
		"./lib/modules/$kernel_version/kernel/drivers/block/virtio_blk.ko"
dpkg-deb -x busybox-static_*.deb busybox
[ -x busybox/bin/busybox ] || die "busybox-static has no bin/busybox"

# The bzImage: the protected-mode code starts at (setup_sects + 1) * 512; its header's
# payload_offset and payload_length (boot protocol 2.08+) locate the compressed vmlinux in it.
bzimage="kernel/boot/vmlinuz-$kernel_version"
le() { od -A n -t "u$2" -j "$1" -N "$2" "$bzimage" | tr -d ' '; }
[ "$(od -A n -t x1 -j 514 -N 4 "$bzimage" | tr -d ' ')" = 48647253 ] ||
	die "$bzimage is not a bzImage (no HdrS)"
setup_sects=$(le $((0x1f1)) 1)
[ "$setup_sects" -ne 0 ] || setup_sects=4
payload_offset=$(le $((0x248)) 4)
payload_length=$(le $((0x24c)) 4)
dd if="$bzimage" of=payload bs=1M iflag=skip_bytes,count_bytes status=none \
	skip=$(((setup_sects + 1) * 512 + payload_offset)) count="$payload_length"
case "$(od -A n -t x1 -N 6 payload | tr -d ' ')" in
fd377a585a00) xz -dc --single-stream <payload >vmlinux ;;
1f8b*) gzip -dc <payload >vmlinux 2>/dev/null || [ -s vmlinux ] ;;
28b52ffd*) zstd -dc <payload >vmlinux ;;
*) die "$bzimage: unknown payload compression ($(od -A n -t x1 -N 6 payload))" ;;
esac
[ "$(od -A n -t x1 -N 4 vmlinux | tr -d ' ')" = 7f454c46 ] ||
	die "the payload of $bzimage did not decompress to an ELF vmlinux"

# The modules /init loads, each after the modules its `depends=` field names (read from the
# .modinfo section, the way `modinfo -F depends` does).
modules="kernel/lib/modules/$kernel_version/kernel/drivers"
module_path() {
	local m
	for m in "$modules/virtio/$1.ko" "$modules/block/$1.ko"; do
		[ -f "$m" ] && { echo "$m"; return; }
	done
	die "module $1 is not in $kernel_pkg (is it built in?)"
}
order=()
add_module() {
	local m dep
	for m in "${order[@]}"; do [ "$m" = "$1" ] && return; done
	for dep in $(tr '\0' '\n' <"$(module_path "$1")" | sed -n 's/^depends=//p' | tr ',' ' '); do
		add_module "$dep"
	done
	order+=("$1")
}
add_module virtio_pci
add_module virtio_blk

root=initramfs
mkdir -p "$root"/{bin,dev,proc,sys,lib/modules}
cp busybox/bin/busybox "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
cp "$here/init" "$root/init"
chmod 755 "$root/init"
for m in "${order[@]}"; do
	cp "$(module_path "$m")" "$root/lib/modules/"
	echo "$m" >>"$root/lib/modules/order"
done
# busybox's own cpio writes the newc archive, so the host needs no cpio.
(cd "$root" && find . | LC_ALL=C sort | ../busybox/bin/busybox cpio -o -H newc -R 0:0) |
	gzip -9n >initramfs.cpio.gz

mkdir kit
mv vmlinux initramfs.cpio.gz kit/
echo "$kernel_version" >kit/kernel-version
printf '%s\n' "${order[@]}" >kit/modules
# Another build may have finished first: either kit is complete, keep the one in place.
mv -T kit "$kit" 2>/dev/null || [ -f "$kit/initramfs.cpio.gz" ] || die "cannot move the kit to $kit"
echo "$kit"
