# The one image recipe of every component. prefect.yaml's build step passes the component's
# directory as the build context and its name as COMPONENT; PREFECT_IMAGE comes from .env.
ARG PREFECT_IMAGE
FROM ${PREFECT_IMAGE}
ARG COMPONENT
WORKDIR /opt/prefect/pipeline
# Locked dependencies first, in their own layer: a code-only change rebuilds just the layers below.
COPY requirements.lock ${COMPONENT}/requirements.lock
RUN pip install --no-cache-dir --require-hashes -r ${COMPONENT}/requirements.lock
COPY . ${COMPONENT}/
# Bytecode at build time: each flow-run container skips compiling on start, and needs no
# writable filesystem for it (the pools run containers with a read-only root).
RUN python -m compileall -q ${COMPONENT}
# Unprivileged by default; the work pools also force this user.
USER 10001:10001
