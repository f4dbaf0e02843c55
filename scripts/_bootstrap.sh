# Sourced by the scripts in this folder: create .venv once and keep it in sync.
#   GRADSPARSE_TORCH_VERSION  torch version to pin (default 2.13.0, the CPU wheel here)
#   GRADSPARSE_VENV           where the virtual environment lives (default .venv)
#   EXTRAS                    setup.cfg extras to install (default: test,train,lightning,transformers,docs)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GRADSPARSE_VENV:-$ROOT/.venv}"
TORCH_VERSION="${GRADSPARSE_TORCH_VERSION:-2.13.0}"
EXTRAS="${EXTRAS:-test,train,lightning,transformers,docs}"
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
_stamp="$VENV/.gradsparse-stamp"
_want="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16) torch=$TORCH_VERSION extras=$EXTRAS"
if [ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ]; then
  echo "bootstrap: installing torch==$TORCH_VERSION and gradsparse[$EXTRAS] into $VENV" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  # torch first and pinned: an unpinned resolve would pull the multi-GB CUDA build.
  "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION"
  "$VENV/bin/python" -m pip install -q -e "$ROOT[$EXTRAS]"
  echo "$_want" > "$_stamp"
fi
export PATH="$VENV/bin:$PATH"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
