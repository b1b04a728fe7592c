#!/usr/bin/env bash
# Wheels the lent GPU machine lacks (its image has Python 3.12, torch, triton, numpy; no package index), for
# bench/gpu_suite.sh: the titans-pytorch and fla baselines and the server's own dependencies, downloaded here into
# .gpu-wheels/ (git-ignored), which the device call carries and the suite installs:
#   bash bench/gpu_wheels.sh
#   run(carry=[".gpu-wheels"], command="bash bench/gpu_suite.sh")
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-.venv/bin/pip}"
rm -rf .gpu-wheels && mkdir .gpu-wheels
# --no-deps: titans-pytorch 0.5.5's dependency tree and ours, minus what the image has (torch, its sympy), at the
# versions the project's venv runs the baseline with
"$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --platform manylinux_2_28_x86_64 --platform any -d .gpu-wheels \
    safetensors==0.8.0 tokenizers==0.23.3 titans-pytorch==0.5.5 assoc-scan==0.0.6 accelerated-scan==0.3.1 \
    axial-positional-embedding==0.3.12 einops==0.8.2 einx==0.4.3 frozendict==2.5.1 hyper-connections==0.4.11 \
    torch-einops-utils==0.2.0 rotary-embedding-torch==0.9.1 tensordict==0.15.3 cloudpickle==3.1.3 pyvers==0.2.3 \
    x-transformers==2.31.10 loguru==0.7.3 tqdm==4.70.1 ninja==1.13.2 packaging==26.4 fla-core==0.6.0 \
    fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 pydantic==2.14.4 pydantic-core==2.50.5 \
    pydantic-settings==2.16.3 python-dotenv==1.2.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
    anyio==4.16.0 sniffio==1.3.1 idna==3.21 h11==0.16.0 click==8.5.1 httpx==0.29.0 httpcore==1.0.9 \
    certifi==2026.10.19.post1 prometheus-client==0.26.0 redis==8.2.0 typing-extensions==4.16.0 uvloop==0.23.0 \
    httptools==0.9.0 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0
du -sh .gpu-wheels
