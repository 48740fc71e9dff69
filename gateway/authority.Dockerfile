# The gateway's authority (authority.py, rules.py): Prefect's own image has what it needs
# (starlette, uvicorn, httpx, websockets). Baked, not bind-mounted, like the nginx template.
ARG PREFECT_IMAGE
FROM ${PREFECT_IMAGE}
WORKDIR /opt/gateway
COPY authority.py rules.py gateway/
CMD ["uvicorn", "gateway.authority:create_app", "--factory", "--host", "0.0.0.0", "--port", "4201", "--ws", "websockets", "--no-access-log"]
