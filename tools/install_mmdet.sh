#!/usr/bin/env bash
# Install mmdet 3.3 with mmcv 2.1's compiled CPU ops into the active Python, for the
# solov2_r50 case (align/cases/solov2.py). PyPI ships mmcv 2.1 as source only, and that
# source does not build against torch 2.14 as published: its setup.py asks for C++17,
# torch's headers need C++20. This patches that flag and builds the ops (77 C++ files,
# no CUDA): 5.5 min on 2 cores, measured. Optimization is off (-O0): the
# build is for checking SOLOv2 on the CPU, where none of mmcv's compiled ops run.
set -euo pipefail
MMCV=2.1.0
MMDET=3.3.0
MMDET=$MMDET MMCV=$MMCV python - 2>/dev/null <<'PY' && { echo "mmdet $MMDET with mmcv's ops is already installed"; exit 0; }
import importlib.metadata as m, importlib.util as u, os, pathlib
assert m.version("mmdet") == os.environ["MMDET"] and m.version("mmcv") == os.environ["MMCV"]
assert any(pathlib.Path(u.find_spec("mmcv").origin).parent.glob("_ext*.so"))
PY
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# mmcv's setup.py imports torch (so no build isolation: it must see the torch it builds
# against) and pkg_resources, gone from setuptools 70 on; torch itself wants a newer
# setuptools, so the old one (and a wheel that still has bdist_wheel) is on PYTHONPATH
# for the build only
pip download -q --no-deps --only-binary :all: -d "$work/wheels" "setuptools<70" "wheel<0.44"
for w in "$work"/wheels/*.whl; do python -m zipfile -e "$w" "$work/setuptools"; done
export PYTHONPATH="$work/setuptools${PYTHONPATH:+:$PYTHONPATH}"
pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$work" "mmcv==$MMCV"
tar xzf "$work/mmcv-$MMCV.tar.gz" -C "$work"
sed -i "s/-std=c++17/-std=c++20/" "$work/mmcv-$MMCV/setup.py"
start=$(date +%s)
(cd "$work/mmcv-$MMCV" && MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
  CFLAGS="-O0 -g0" CXXFLAGS="-O0 -g0" pip wheel -q --no-build-isolation --no-deps -w "$work/wheel" .)
unset PYTHONPATH
echo "mmcv $MMCV ops built in $(( $(date +%s) - start )) s"
pip install -q "$work"/wheel/mmcv-*.whl "mmdet==$MMDET"
