#!/usr/bin/env bash
# Pack what the GPU image lacks for the service and the evals into one compressed site folder,
# to carry to the GPU machine (no package index there) within its 64 MiB carry limit.
# Run HERE (a machine that reaches the package index), from the repository root:
#   bash benchmarks/pack_site.sh            # -> .whl/site-cp312.tar.xz (the GPU image's Python)
#   PY=3.11 bash benchmarks/pack_site.sh    # -> .whl/site-cp311.tar.xz (to test the recipe here)
# On the GPU machine: mkdir -p /tmp/site && tar -xJf .whl/site-cp312.tar.xz -C /tmp/site, then
# PYTHONPATH=/tmp/site:$PWD (benchmarks/two_gpus.sh does it).
#
# What goes in: versions from requirements.lock of the packages requirements.lock has and the
# GPU image does not (the device tool's notes list the image's packages), as far as Ray Serve,
# the app and the evals import them, plus transformers (the image's is older than pyproject's
# floor) and grpcio + protobuf (the image's grpcio 1.84 refuses the locked grpcio-reflection's
# generated code). What is cut to fit: Ray's Java jars, dashboard web client, RLlib and ray.llm (none is
# used by Serve or a private cluster), the symbols of Ray's binaries, and transformers' model
# folders that nothing we load can import: kept are the LLaVA families with their backbones,
# every folder transformers' own modules outside models/ name, and what those import in turn
# (a static closure, 171 of 558).
# xz instead of the wheels' deflate: Ray's binaries (gcs_server, raylet, _raylet.so) shrink by
# about a third more; -9e's 64 MiB dictionary (one block) finds what the files share: 30 MiB
# instead of -7's 36, which keeps archive + tracked tree under the carry limit (2.5 min here).
set -euo pipefail
PY=${PY:-3.12}
TAG=cp${PY/./}
DEST=${1:-.whl/site-$TAG.tar.xz}
PACKAGES=(
  ray pydantic pydantic-core annotated-types typing-inspection
  fastapi starlette uvicorn python-multipart
  jsonschema jsonschema-specifications referencing rpds-py
  aiohttp-cors colorful smart-open grpcio grpcio-reflection protobuf mmh3
  opencensus opencensus-context google-api-core google-auth googleapis-common-protos proto-plus
  pyasn1 pyasn1-modules
  opentelemetry-api opentelemetry-sdk opentelemetry-proto opentelemetry-exporter-prometheus
  opentelemetry-semantic-conventions
  transformers
)
pins=()
for name in "${PACKAGES[@]}"; do
  pin=$(grep -i -E "^${name//-/[-_]}==" requirements.lock | sed 's/ *;.*//') \
    || { echo "$name is not in requirements.lock" >&2; exit 2; }
  pins+=("$pin")
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
platform=(--only-binary=:all: --python-version "$PY" --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps "${platform[@]}" -d "$work/wheels" "${pins[@]}"
python3 -m pip install -q --no-deps --no-compile "${platform[@]}" --target "$work/site" \
  "$work/wheels"/*.whl
cd "$work/site"
rm -rf ray/jars ray/dashboard/client/build ray/rllib ray/llm bin
# Ray's binaries carry their symbol tables (a third of their size); running needs none of it.
strip --strip-unneeded ray/_raylet.so ray/core/src/ray/gcs/gcs_server \
  ray/core/src/ray/raylet/raylet ray/core/libjemalloc.so
python3 - <<'PY'
import glob, os, re, shutil
os.chdir("transformers")
models = {d for d in os.listdir("models") if os.path.isdir(f"models/{d}")} - {"__pycache__"}
keep = {"auto", "encoder_decoder", "llava", "llava_next", "llava_onevision", "llama", "qwen2",
        "clip", "siglip"}
for path in glob.glob("**/*.py", recursive=True):
    if not path.startswith("models/"):
        keep |= set(re.findall(r"models\.([a-z0-9_]+)", open(path).read())) & models
todo = list(keep)
while todo:
    for path in glob.glob(f"models/{todo.pop()}/*.py"):
        text = open(path).read()
        found = set(re.findall(r"from \.\.([a-z0-9_]+)", text))
        found |= set(re.findall(r"models\.([a-z0-9_]+)", text))
        for name in (found & models) - keep:
            keep.add(name)
            todo.append(name)
for name in models - keep:
    shutil.rmtree(f"models/{name}")
print(f"transformers: kept {len(keep)} of {len(models)} model folders")
PY
find . -name __pycache__ -prune -exec rm -rf {} +
cd - > /dev/null
mkdir -p "$(dirname "$DEST")"
tar -C "$work/site" -cf - . | xz -T2 -9e > "$DEST"
echo "$DEST: $(du -h "$DEST" | cut -f1) ($(printf '%s ' "${pins[@]}"))"
