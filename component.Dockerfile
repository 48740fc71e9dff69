# The one image recipe of every component. prefect.yaml's build step builds it with the
# repository as the context (.dockerignore keeps the rest out) and the component's directory as
# COMPONENT; PREFECT_IMAGE and FLOW_UID come from .env. Each image gets its component and the
# step kit, nothing of any other component.
ARG PREFECT_IMAGE
FROM ${PREFECT_IMAGE}
WORKDIR /opt/prefect/pipeline
# Locked dependencies first: a code-only change rebuilds just the layers below. The step kit's
# come before anything of the component's, so every component image shares that layer (built and
# pushed once); the component's lock agrees with it (tools/lock.py), so pip skips what it holds.
COPY stepkit/requirements.lock stepkit/requirements.lock
RUN pip install --no-cache-dir --no-deps --require-hashes -r stepkit/requirements.lock
# Declared after the shared layer: every RUN after an ARG has its value in its cache key.
ARG COMPONENT
ARG FLOW_UID
COPY ${COMPONENT}/requirements.lock ${COMPONENT}/requirements.lock
RUN pip install --no-cache-dir --no-deps --require-hashes -r ${COMPONENT}/requirements.lock
# The step kit this component is built with (stepkit/): the image keeps it until redeployed.
COPY stepkit/ stepkit/
COPY ${COMPONENT}/ ${COMPONENT}/
ENV PYTHONPATH=/opt/prefect/pipeline
# Bytecode at build time: each flow-run container skips compiling on start, and needs no
# writable filesystem for it (the pools run containers with a read-only root).
RUN python -m compileall -q stepkit ${COMPONENT}
# Unprivileged by default; the work pools also force this user.
USER ${FLOW_UID}:${FLOW_UID}
