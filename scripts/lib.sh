# Shared by scripts/run and scripts/test: set-up steps for a fresh Debian machine.
# shellcheck shell=bash

say() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Installs the Debian packages given that are not installed yet (apt-get update once, first).
ensure_packages() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "need root to install: ${missing[*]}"
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# The Rust toolchain comes with the machine (rustup); it cannot be fetched by a script here.
ensure_cargo() {
    if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
    command -v cargo >/dev/null 2>&1 || die "cargo not found: install a Rust toolchain (rustup) first"
}

# What building needs: a C toolchain for -sys crates, cmake (pingora's zlib-ng), protoc and the well-known .proto files (etcd-client).
BUILD_PACKAGES=(build-essential pkg-config cmake protobuf-compiler libprotobuf-dev)

# Installs the Python modules given as IMPORT_NAME:PIP_NAME that do not import yet (pip,
# into the python3 on PATH; Debian's own Python needs --break-system-packages for that).
ensure_python_modules() {
    local missing=()
    for spec in "$@"; do
        python3 -c "import ${spec%%:*}" 2>/dev/null || missing+=("${spec#*:}")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    python3 -m pip --version >/dev/null 2>&1 || ensure_packages python3-pip
    say "installing Python modules ${missing[*]}"
    python3 -m pip install -q --break-system-packages "${missing[@]}"
}
