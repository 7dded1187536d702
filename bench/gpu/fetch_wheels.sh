#!/usr/bin/env bash
# Download, on a machine with network, the wheels that bench/gpu/run.sh installs on a GPU
# machine that has no network: CPython 3.12, manylinux x86_64, into bench/gpu/wheels/ (ignored
# by git). The GPU image already holds Python 3.12 with torch, torchvision, transformers, timm,
# numpy, pandas, pyarrow, scipy, scikit-learn, pillow, safetensors, huggingface-hub, tqdm,
# pyyaml, typer, click, rich, attrs, certifi, pyparsing and opencv-python-headless; what is
# listed below is what patchbalance and the check need on top of that. The versions are those
# the test suite runs with.
#
#   bash bench/gpu/fetch_wheels.sh [PYTHON]      # PYTHON: an interpreter with pip (default python3)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dest="$here/wheels"
python="${1:-python3}"
mkdir -p "$dest"

# name==version  why it is needed
wanted=(
  "rasterio==1.4.4"                 # every raster read (bundles GDAL)
  "affine==3.0.1"                   # rasterio
  "cligj==0.7.2"                    # rasterio
  "click-plugins==1.1.1.2"          # rasterio
  "pydantic==2.14.4"                # configuration validation
  "pydantic-core==2.50.5"           # pydantic
  "annotated-types==0.8.0"          # pydantic
  "typing-inspection==0.4.5"        # pydantic
  "omegaconf==2.3.1"                # configuration loading
  "hydra-core==1.3.8"               # train: instantiates model, loss and optimizer
  "segmentation-models-pytorch==0.6.0"  # train: the Unet
  "faiss-cpu==1.15.1"               # the kNN baseline (IndexFlatIP on the CPU cores)
  # Installed only where the machine's copy is older than a wheel above requires.
  "typing-extensions==4.16.0"       # pydantic needs >= 4.16
  "click==8.5.1"                    # rasterio rejects click 8.2.*
)
skipped=(
  "albumentations, albucore, simsimd, stringzilla: the check's training config uses no augmentations, so the dataset never imports them"
  "faiss-gpu-cu12: 48.4 MB itself (1.14.1.post1) and built for CUDA 12, so it also needs nvidia-cublas-cu12 (581.2 MB) and nvidia-cuda-runtime-cu12 beside the GPU image's CUDA 13; far over the 60 MB for all wheels. The check measures the product's own CUDA kNN (uniqueness exact) against faiss-cpu"
  "hnswlib, dask, psycopg, matplotlib: not used by the check"
)

platforms=(
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
  --platform manylinux1_x86_64
)
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d "$dest" "${wanted[@]}"
# omegaconf pins antlr4-python3-runtime 4.9.*, published as a source archive only; it is pure
# Python, so build its wheel here.
"$python" -m pip wheel --quiet --no-deps --no-binary=:all: -w "$dest" \
  "antlr4-python3-runtime==4.9.3"

echo "fetched into $dest:"
total=0
for wheel in "$dest"/*.whl; do
  size=$(stat -c %s "$wheel")
  total=$((total + size))
  printf '  %8.2f MB  %s\n' "$(echo "$size / 1000000" | bc -l)" "$(basename "$wheel")"
done
printf '  %8.2f MB  in all\n' "$(echo "$total / 1000000" | bc -l)"
echo "not fetched:"
for line in "${skipped[@]}"; do echo "  $line"; done
