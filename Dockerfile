# Build a wheel, then install it into a slim runtime image that runs as a non-root user.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY gateway ./gateway
# Every dependency at the version the test suite ran with (constraints.txt).
RUN pip wheel --no-cache-dir --wheel-dir /wheels --constraint constraints.txt .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin gateway
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels image-gateway && rm -rf /wheels
# /metrics on its own port, never on the API port (its series carry every key's id and usage):
# publish 8080 through the load balancer, and let only Prometheus reach 9100.
ENV GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8080 \
    GATEWAY_METRICS_PORT=9100 \
    PYTHONUNBUFFERED=1
USER gateway
EXPOSE 8080 9100
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
# exec form: SIGTERM reaches the server directly.
ENTRYPOINT ["gateway"]
CMD ["serve"]
