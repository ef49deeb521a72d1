# syntax=docker/dockerfile:1
# Minimal static images for the broker and the sidecar: one statically linked
# binary (musl), CA certificates for the broker, user 65532, nothing else (no
# shell, no package manager). Both run with a read-only root filesystem.
#
#   docker build --target broker  -t tessera-broker:0.1.0 .
#   docker build --target sidecar -t tessera-sidecar:0.1.0 .
#
# Not built by the tests: no Docker engine runs where they run (README, "Images").

FROM rust:1.95-alpine AS build
RUN apk add --no-cache musl-dev ca-certificates
WORKDIR /src
COPY . .
# protox compiles the protos, so no protoc is needed; ring is the only crypto.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin tessera-broker --bin tessera-sidecar \
 && mkdir /out \
 && cp target/release/tessera-broker target/release/tessera-sidecar /out/

FROM scratch AS broker
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /out/tessera-broker /tessera-broker
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
USER 65532:65532
EXPOSE 8443 9443 9090
ENTRYPOINT ["/tessera-broker"]
CMD ["serve", "--config", "/etc/tessera/config/broker.yaml"]

# The injected container runs `/tessera-sidecar run|once|check` (the webhook
# sets the arguments and the startup probe's command).
FROM scratch AS sidecar
COPY --from=build /out/tessera-sidecar /tessera-sidecar
USER 65532:65532
ENTRYPOINT ["/tessera-sidecar"]
CMD ["run"]
