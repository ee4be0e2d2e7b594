#!/usr/bin/env bash
# Build an emulated arm64 "board" for benchmarks/arm_parity.py (DESIGN.md, "Running arm64 code on this x86 machine"):
# Debian's qemu-user-static, a Debian arm64 sysroot with python3.11 (unpacked with dpkg -x, nothing installed),
# and the aarch64 wheels of ai-edge-litert (1.4.0: the newest with a cp311 aarch64 wheel), numpy, flatbuffers and pillow.
# Usage: benchmarks/arm_sysroot.sh [DIR]   (default /work/arm; needs root for apt-get; about 200 MB)
set -euo pipefail
DIR="${1:-/work/arm}"
if ! command -v qemu-aarch64-static >/dev/null; then
  apt-get install -y -qq qemu-user-static
fi
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  dpkg --add-architecture arm64
  apt-get update -qq
fi
mkdir -p "$DIR/debs" "$DIR/root" "$DIR/wheels" "$DIR/site"
cd "$DIR/debs"
apt-get download -qq python3.11-minimal:arm64 libpython3.11-minimal:arm64 libpython3.11-stdlib:arm64 \
  python3.11:arm64 libc6:arm64 libstdc++6:arm64 libgcc-s1:arm64 zlib1g:arm64 libexpat1:arm64 libffi8:arm64 \
  libssl3:arm64 libbz2-1.0:arm64 liblzma5:arm64 libsqlite3-0:arm64 libuuid1:arm64 libncursesw6:arm64 \
  libtinfo6:arm64 libreadline8:arm64 libgomp1:arm64 libcrypt1:arm64 libnsl2:arm64 libtirpc3:arm64 \
  libdb5.3:arm64 libgssapi-krb5-2:arm64 libkrb5-3:arm64 libk5crypto3:arm64 libkrb5support0:arm64 \
  libcom-err2:arm64 libkeyutils1:arm64
for f in *.deb; do dpkg -x "$f" ../root; done
cd "$DIR"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 --implementation cp \
  --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 \
  -d wheels "ai-edge-litert==1.4.0" numpy flatbuffers pillow
for w in wheels/*.whl; do python3 -m zipfile -e "$w" site; done
# The same ai-edge-litert for x86_64: arm_parity.py runs it too, so that arm64 against x86 differs in the kernels alone.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d wheels-x86 "ai-edge-litert==1.4.0"
mkdir -p x86-site && python3 -m zipfile -e wheels-x86/ai_edge_litert-1.4.0-*.whl x86-site
cat > python <<PY
#!/bin/sh
# The emulated board's python: arm64 python3.11 from the sysroot under qemu-aarch64-static.
exec env PYTHONPATH="$DIR/site\${PYTHONPATH:+:\$PYTHONPATH}" qemu-aarch64-static -L "$DIR/root" "$DIR/root/usr/bin/python3.11" "\$@"
PY
chmod +x python
"$DIR/python" -c "import platform, numpy, ai_edge_litert; print(platform.machine(), numpy.__version__)"
