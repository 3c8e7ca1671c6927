#!/usr/bin/env bash
# Checks what `make` needs before it builds anything, and says in one line what to do if not.
PYTHON="${1:-python3}"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "error: $PYTHON not found: install Python 3.11 or newer (apt-get install python3 python3-venv) or run make PYTHON=/path/to/python3.11" >&2; exit 1
fi
if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
  echo "error: lowbit needs Python >= 3.11 but $PYTHON is $("$PYTHON" -c 'import platform; print(platform.python_version())'): run make PYTHON=/path/to/python3.11" >&2; exit 1
fi
if ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  echo "error: $PYTHON cannot create virtual environments: apt-get install python3-venv" >&2; exit 1
fi
CXX_BIN="${CXX:-c++}"
if ! command -v "$CXX_BIN" >/dev/null 2>&1; then
  echo "error: no C++17 compiler ($CXX_BIN) found to build lowbit's kernels: apt-get install g++ (or set CXX)" >&2; exit 1
fi
if ! printf '#include <cstdint>\nint main(){return 0;}\n' | "$CXX_BIN" -std=c++17 -x c++ - -o /dev/null >/dev/null 2>&1; then
  echo "error: $CXX_BIN cannot compile C++17: install a newer g++ (>= 9) or clang++ and set CXX" >&2; exit 1
fi
