# sana-appliance: full-rank Sana fine-tuning in one container.
#
# Build (CUDA 12 image; BuildKit is needed for the secret and bind mounts; GIT_SHA goes
# into every run.json):
#   DOCKER_BUILDKIT=1 docker build --build-arg GIT_SHA=$(git rev-parse HEAD) -t sana-appliance .
# Without an image registry, build on a local base: README "Docker, RunPod, Vast" shows the
# debootstrap + `--build-arg BASE_IMAGE=...` lines.
# Behind TLS interception or a corporate proxy, hand pip your CA bundle. It is
# mounted only while the install steps run and never lands in a layer, ENV or ARG:
#   DOCKER_BUILDKIT=1 docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt -t sana-appliance .
# torch from your own wheel instead of TORCH_INDEX_URL: put torch-*.whl in docker/wheels/.
# Run (demo on CPU; see docker/ for compose, RunPod and Vast.ai):
#   docker run --rm -v "$PWD/workspace:/workspace" sana-appliance
#
# Base image choice: `base` (not runtime/cudnn, not devel). The torch CUDA wheels
# bring their own user-space CUDA libraries (cuBLAS, cuDNN, NCCL as nvidia-* wheels),
# bitsandbytes ships its compiled kernels and Triton bundles ptxas, so nothing here
# compiles CUDA code at run time or needs the toolkit. runtime-cudnn would duplicate
# ~3 GB of libraries torch never loads; `base` only marks the image for the NVIDIA
# container toolkit (which mounts the driver). Ubuntu 24.04 gives Python 3.12
# (numpy 2.4 in the lock needs >= 3.11). Any Debian/Ubuntu base works, with or
# without Python: tests build this file on a debootstrap'd Debian.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# OS packages: Python + venv (absent from nvidia/cuda images), tini as PID 1,
# setpriv (util-linux) for the start shim to drop root, and gcc with the Python headers
# for compile_transformer (Triton builds its kernel launchers with them on first use).
# The CA secret also serves apt for https mirrors behind an intercepting proxy.
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then \
        echo 'Acquire::https::CAInfo "/run/secrets/ca";' > /etc/apt/apt.conf.d/99build-ca; \
    fi; \
    apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates python3 python3-venv python3-dev gcc libc6-dev tini util-linux \
    && rm -rf /var/lib/apt/lists/* /etc/apt/apt.conf.d/99build-ca

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python3 -m venv /opt/venv

# torch first, alone: it is the biggest layer and changes least, so it depends only
# on TORCH_VERSION and its source, not on the lock. From docker/wheels/ when a torch
# wheel lies there (bind-mounted, so the wheel itself is never copied into a layer),
# else from TORCH_INDEX_URL. The next step moves its small dependencies (sympy,
# networkx, jinja2, fsspec, filelock) to the locked versions.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
RUN --mount=type=secret,id=ca \
    --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,source=docker/wheels,target=/tmp/wheels \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca REQUESTS_CA_BUNDLE=/run/secrets/ca; fi; \
    if find /tmp/wheels -maxdepth 1 -name "torch-*.whl" | grep -q .; then \
        echo "torch ${TORCH_VERSION} from docker/wheels/"; \
        pip install --no-index --find-links /tmp/wheels --no-deps "torch==${TORCH_VERSION}"; \
    else \
        echo "torch ${TORCH_VERSION} from ${TORCH_INDEX_URL}"; \
        export PIP_INDEX_URL="${TORCH_INDEX_URL}" PIP_EXTRA_INDEX_URL=https://pypi.org/simple; \
    fi \
    && pip install "torch==${TORCH_VERSION}" \
    && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# Every other runtime dependency, exactly as locked. Changes only with the lock.
RUN --mount=type=secret,id=ca \
    --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,source=requirements.lock,target=/tmp/requirements.lock \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca REQUESTS_CA_BUNDLE=/run/secrets/ca; fi; \
    pip install --requirement /tmp/requirements.lock \
    && pip check

# The unprivileged user that trains. uid 1000 matches the first user on most hosts;
# Ubuntu 24.04 bases already have an `ubuntu` user with that uid, which is replaced.
# /workspace belongs to it, so a named volume starts out writable.
RUN if getent passwd 1000 >/dev/null; then userdel --remove "$(getent passwd 1000 | cut -d: -f1)"; fi \
    && if getent group 1000 >/dev/null; then groupdel "$(getent group 1000 | cut -d: -f1)"; fi \
    && groupadd --gid 1000 sana \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash sana \
    && install -d -o sana -g sana -m 0755 /workspace

# The code, last, so an edit rebuilds only this layer. It is installed from a
# throw-away bind mount of the context (a real wheel install, presets included;
# `sana-appliance presets` proves they were packaged); only the two start scripts
# are copied. Everything stays owned by root: the trainer can run the code but
# not change it.
RUN --mount=type=secret,id=ca \
    --mount=type=bind,target=/tmp/src,rw \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca REQUESTS_CA_BUNDLE=/run/secrets/ca; fi; \
    pip install --no-cache-dir --no-deps /tmp/src \
    && sana-appliance presets
COPY entrypoint.py /app/entrypoint.py
COPY docker/entrypoint.sh /usr/local/bin/sana-entrypoint

# Labels last: a new commit must not invalidate the dependency layers above.
ARG BASE_IMAGE
ARG VERSION=0.0.0+unknown
ARG GIT_SHA=unknown
LABEL org.opencontainers.image.title="sana-appliance" \
      org.opencontainers.image.description="Full-rank fine-tuning of NVIDIA Sana: cache, train, validate, checkpoint, resume, upload" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_SHA}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

# torch wheels run on any CUDA 12 driver (minor version compatibility, driver >= 525),
# but nvidia/cuda:12.8 images demand a 12.8 driver and the container toolkit would
# refuse common RunPod/Vast hosts. Ask only for what the wheels need.
ENV NVIDIA_REQUIRE_CUDA="cuda>=12.0" \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    WORKSPACE=/workspace \
    APPLIANCE_GIT_SHA="${GIT_SHA}" \
    APPLIANCE_IMAGE="sana-appliance:${VERSION}"

WORKDIR /workspace
# No USER line on purpose: docker/entrypoint.sh starts as root only to pick the
# unprivileged user (the owner of $WORKSPACE, else `sana`) and drops to it, because
# RunPod and Vast.ai mount /workspace owned by root and cannot pass --user. With
# --user (or Kubernetes runAsUser) it starts unprivileged and changes nothing.
# tini reaps zombies and forwards SIGTERM/SIGINT to python only (no -g): the trainer
# saves a checkpoint and exits 143/130; DataLoader workers must not get the signal
# first. `docker stop` grants 10 s by default; give more with --stop-timeout.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/sana-entrypoint", "/opt/venv/bin/python", "/app/entrypoint.py"]
