#!/usr/bin/env bash
# Installs the service and its client as the README's commands do; the container image runs this same script
# (deploy/docker/Dockerfile). Usage: scripts/install.sh [--release] [EXTRAS], e.g. `scripts/install.sh test` for
# '.[test]'. Editable installs for development; --release installs both as ordinary packages (the image: nothing
# of the checkout is needed after the install).
#   TORCH_INDEX_URL  where torch comes from: unset, pip's own index (on these dev machines a local CPU build);
#                    the CPU image uses https://download.pytorch.org/whl/cpu, the CUDA image
#                    https://download.pytorch.org/whl/cu128 (torch's CUDA build).
#   PIP_CONSTRAINT   pip's own variable: the image pins every version with deploy/docker/constraints.txt.
# torch is pinned here and installed first: a plain `torch` pulls a multi-GB CUDA build where only the CPU is
# wanted, while the package metadata stays open (torch>=2.4) for the CUDA build a GPU machine installs.
set -euo pipefail
cd "$(dirname "$0")/.."
EDITABLE=-e
if [[ "${1:-}" == "--release" ]]; then EDITABLE=; shift; fi
TORCH_VERSION=2.13.0
python3 -m pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple} \
  "torch==${TORCH_VERSION}"
# The client and the service: the service names the client by its version here (setup.py).
EMBEDDING_SERVICE_CLIENT_REQUIREMENT="embedding-service-client==0.1.0" \
  python3 -m pip install -q $EDITABLE ./client $EDITABLE ".${1:+[$1]}"
