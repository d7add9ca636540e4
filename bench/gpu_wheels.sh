#!/usr/bin/env bash
# Wheels of the service's packages for the lent GPU machine (Python 3.12, x86-64, no package
# registry there; its image has torch, numpy, scikit-learn, safetensors, onnx, onnxruntime, jinja2,
# fsspec... but not the service's web, queue and database packages). Each at the version this
# venv has, into .whl/ (ignored by git), for bench/gpu_session.sh's packing step. On the device:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#
# (the run carries .whl: carry [".whl"]). Read off what `trainyard serve`, its worker and API import
# (2026-12-06); the web and CLI packages the image has at other versions are carried too, so the
# service runs with the versions it is tested with.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
NAMES="Mako SQLAlchemy alembic amqp annotated-types billiard celery vine cffi pycparser cryptography
click-didyoumean click-plugins click-repl colorlog fastapi starlette fastapi-offline greenlet
httpx-retries httpx-sse itsdangerous json-merge-patch kombu opentelemetry-api optuna prompt_toolkit
wcwidth psycopg psycopg-binary pydantic pydantic_core pydantic-settings python-dotenv
python-multipart redis sse-starlette typing-inspection typing_extensions tzlocal uvicorn httptools
typer click rich shellingham markdown-it-py mdurl pygments httpx httpcore anyio h11 idna certifi
annotated-doc prometheus_client jinja2 markupsafe fsspec packaging"
REQS=$(mktemp)
"$PY" - "$NAMES" > "$REQS" <<'EOF'
import importlib.metadata as md
import sys

for name in sys.argv[1].split():
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(f"not installed here, skipped: {name}", file=sys.stderr)
EOF
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_34_x86_64 --platform manylinux1_x86_64 -d .whl -r "$REQS"
rm -f "$REQS"
echo "$(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/"
