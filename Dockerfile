# relayhub: multi-stage build. Not built on the machines this project is developed on (no Docker engine
# there); kept simple and checked by reading.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# A workspace member: cargo reads its manifest even when building only the hub.
COPY bench ./bench
COPY config ./config
# Built into the binary (the dashboard and relayhub.js).
COPY web ./web
RUN cargo build --release --bin relayhub

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /app relayhub
WORKDIR /app
COPY --from=build /src/target/release/relayhub /usr/local/bin/relayhub
COPY config ./config
USER relayhub
ENV RELAYHUB_CONFIG=/app/config/production.toml RUST_LOG=info
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/health || exit 1
# SIGTERM (docker stop) closes every client with 1001 and exits within server.shutdown_timeout.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/relayhub"]
