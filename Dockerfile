# Titans Server image: slim, non-root, CPU torch by default; the default model inside.
#   docker build -t titans-server .
#   docker build -t titans-server:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#   docker build -t titans-server:compile --build-arg WITH_COMPILER=1 .   # for TITANS_COMPILE=true on CPU
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY engine engine
COPY kernels kernels
COPY server server
COPY titans titans
RUN pip install --no-cache-dir .

FROM ${PYTHON_IMAGE}
# --build-arg WITH_COMPILER=1 adds g++ (~200 MB), which `--compile true` needs on a CPU (torch.compile's backend)
ARG WITH_COMPILER=""
RUN if [ -n "${WITH_COMPILER}" ]; then apt-get update && apt-get install -y --no-install-recommends g++ \
        && rm -rf /var/lib/apt/lists/*; fi
RUN useradd --create-home --uid 10001 titans && mkdir -p /data && chown titans /data
COPY --from=build /opt/venv /opt/venv
COPY models/titans-mal-recall /opt/titans/models/titans-mal-recall
ENV PATH=/opt/venv/bin:$PATH \
    TITANS_MODEL=/opt/titans/models/titans-mal-recall \
    TITANS_STORE=sqlite:////data/sessions.db \
    TITANS_HOST=0.0.0.0 \
    TITANS_PORT=8000
USER titans
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status != 200)"]
ENTRYPOINT ["titans", "serve"]
