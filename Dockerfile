# Builds the three wallet binaries (gateway, worker, treasury) into one small runtime image.
# docker-compose.yml picks which binary a container runs with `command:`.

# ---- build ------------------------------------------------------------------------------------
FROM rust:1.95-bookworm AS build
WORKDIR /src

COPY Cargo.toml Cargo.lock ./
COPY shared ./shared
COPY gateway ./gateway
COPY worker ./worker
COPY treasury ./treasury
# The load and fault tools are workspace members: cargo needs them to load the workspace.
COPY bench ./bench
COPY chaos ./chaos
# Embedded at compile time by sqlx::migrate!("../migrations") in shared.
COPY migrations ./migrations

RUN cargo build --release --locked -p gateway -p worker -p treasury

# ---- runtime ----------------------------------------------------------------------------------
FROM debian:bookworm-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system wallet \
    && useradd --system --gid wallet --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin wallet

COPY --from=build /src/target/release/gateway /src/target/release/worker /src/target/release/treasury /usr/local/bin/

USER wallet
EXPOSE 8080

# No ENTRYPOINT: the command is the binary to run (gateway, worker or treasury).
CMD ["gateway"]
