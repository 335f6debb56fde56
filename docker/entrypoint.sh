#!/bin/sh
# /usr/local/bin/diracnet in the GPU image: runs the CUDA build with or without a GPU.
#
# The CUDA build links libcuda.so.1, which only the NVIDIA driver provides; the NVIDIA container
# runtime mounts it into the container for `docker run --gpus ...` (and for pods with an
# nvidia.com/gpu limit). Without it the binary could not even start, so this wrapper then puts
# NVIDIA's stub libcuda on the library path: every CUDA call fails, and `--device auto` (the
# default) serves on the CPU and logs `device=cpu`. With the driver present the stub is never used.
set -e

real=/usr/local/libexec/diracnet/diracnet
stubs=/usr/local/lib/diracnet/stubs

have_driver() {
  # The runtime updates the ld cache after mounting the driver; LD_LIBRARY_PATH also counts.
  if ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1 '; then
    return 0
  fi
  old_ifs=$IFS
  IFS=:
  for dir in ${LD_LIBRARY_PATH:-}; do
    if [ -n "$dir" ] && [ "$dir" != "$stubs" ] && [ -e "$dir/libcuda.so.1" ]; then
      IFS=$old_ifs
      return 0
    fi
  done
  IFS=$old_ifs
  return 1
}

if ! have_driver; then
  echo "diracnet: no NVIDIA driver in this container (run it with --gpus all for the GPU);" \
    "CUDA is unavailable, --device auto uses the CPU" >&2
  LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$stubs"
  export LD_LIBRARY_PATH
fi
exec "$real" "$@"
