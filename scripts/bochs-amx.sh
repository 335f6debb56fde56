#!/usr/bin/env bash
# Builds the Bochs x86 emulator with AMX and AVX-512, for the tests that run the AMX kernels on an
# emulated Sapphire Rapids CPU (src/model/cpu/bochs.rs); .ci/run calls it. Prints the binary's
# path; the tests find it there, or where DIRACNET_BOCHS says.
#
#   scripts/bochs-amx.sh            # build once into the cache (about a minute on 2 cores)
#
# Source: the upstream tarball of Debian 13's (trixie's) `bochs` source package, Bochs 3.0,
# through apt from the Debian mirror this machine's apt already uses: a private apt
# configuration in a temporary folder (the system's sources stay as they are) reads the signed
# source index, and apt's downloader fetches the tarball it lists, checked against the index's
# SHA-256, which must also be the one pinned here.
# Debian's tarball is Bochs without its prebuilt BIOS images, which the tests do not use: they
# bring their own ROM. Configured for a 64-bit CPU with AVX, EVEX (AVX-512) and AMX, no GUI, no
# plugins. One change to it: Bochs reads a RAM image (`optramimage`) into its host memory in one
# `read`, past the end of the 128 KiB block it asked for, while its blocks are not consecutive
# in host memory (each is placed when first touched); the change reads block by block.
#
# Needs apt with Debian's archive keyring (a Debian machine), tar with xz, make and a C++
# compiler. Environment:
#   DIRACNET_CACHE          the cache folder (default $XDG_CACHE_HOME/diracnet or ~/.cache/diracnet)
set -euo pipefail

version=3.0+dfsg
sha256=78f6c73d4a6472d5130a87ab9dc306d02c7c71ed8e25b3a8ef642e2a7acd282b
tarball="bochs_${version}.orig.tar.xz"
cache="${DIRACNET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/diracnet}"
dest="$cache/bochs-amx"
# What was built, and how: a change to either rebuilds.
stamp="$version $sha256 amx evex avx x86-64 nogui load_RAM-per-block"

if [ -x "$dest/bochs" ] && [ "$(cat "$dest/stamp" 2>/dev/null)" = "$stamp" ]; then
  echo "$dest/bochs"
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
# The mirror of this machine's Debian packages, as its apt is configured (apt's own $(…) fields).
# shellcheck disable=SC2016
mirror="$(apt-get indextargets --format '$(REPO_URI) $(TARGET_OF) $(LABEL)' |
  awk '$2 == "deb" && $3 == "Debian" { print $1; exit }')"
[ -n "$mirror" ] || { echo "bochs-amx: apt has no Debian mirror configured" >&2; exit 1; }
mkdir -p apt/lists/partial apt/parts
echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" \
  >apt/sources.list
apt=(-o Dir::Etc::SourceList="$PWD/apt/sources.list" -o Dir::Etc::SourceParts="$PWD/apt/parts"
     -o Dir::State::Lists="$PWD/apt/lists" -o APT::Sandbox::User=root)
echo "bochs-amx: the bochs source package of Debian 13, through apt" >&2
apt-get "${apt[@]}" update -qq >&2
# The package's pool folder and upstream tarball, with its SHA-256, from the signed index;
# apt's own downloader fetches that one file and checks it (the whole `apt-get source` also
# wants the .dsc, which not every mirror serves).
entry="$(apt-cache "${apt[@]}" showsrc bochs)"
folder="$(awk '/^Directory:/ { print $2; exit }' <<<"$entry")"
read -r listed _ name < <(awk '/^Checksums-Sha256:/ { f = 1; next }
  f && /^ / && /\.orig\.tar/ { print; exit } f && !/^ / { f = 0 }' <<<"$entry")
[ "$name" = "$tarball" ] && [ "$listed" = "$sha256" ] || {
  echo "bochs-amx: Debian 13 now has $name ($listed), not $tarball: update this script" >&2
  exit 1
}
/usr/lib/apt/apt-helper "${apt[@]}" download-file "$mirror$folder/$tarball" "$tarball" \
  "SHA256:$sha256" >&2
echo "$sha256  $tarball" | sha256sum -c --quiet -
tar xJf "$tarball"
cd bochs-3.0

# Read a RAM image block by block (see the top of this file).
original='ret = read(fd, (bx_ptr_t) BX_MEM_THIS get_vector(offset), size);'
fixed='ret = read(fd, (bx_ptr_t) BX_MEM_THIS get_vector(offset), BX_MIN(size, (unsigned long)(BX_MEM_THIS block_size - offset % BX_MEM_THIS block_size)));'
grep -qF "$original" memory/misc_mem.cc || { echo "bochs-amx: memory/misc_mem.cc changed; the patch no longer applies" >&2; exit 1; }
content="$(cat memory/misc_mem.cc)"
printf '%s\n' "${content//"$original"/"$fixed"}" >memory/misc_mem.cc
grep -qF "$fixed" memory/misc_mem.cc || { echo "bochs-amx: the patch did not apply" >&2; exit 1; }

echo "bochs-amx: building (configure, then make -j$(nproc))" >&2
./configure --enable-x86-64 --enable-cpu-level=6 --enable-avx --enable-evex --enable-amx \
  --enable-all-optimizations --with-nogui --disable-plugins >configure.log 2>&1 \
  || { tail -30 configure.log >&2; exit 1; }
make -j"$(nproc)" >make.log 2>&1 || { tail -30 make.log >&2; exit 1; }

mkdir -p "$dest"
install -m 755 bochs "$dest/bochs"
echo "$stamp" >"$dest/stamp"
echo "bochs-amx: built $dest/bochs" >&2
echo "$dest/bochs"
