#!/usr/bin/env bash
# Rebuild the vendored Cornerstone3D files of the case page from npm (the versions pinned in package.json):
#   tools/viewer/build.sh
# Writes src/covidscan/service/static/vendor/cornerstone/: cornerstone.js (core, tools and the DICOM
# loader as one ES module), decodeImageFrameWorker.js (the DICOM decoding web worker) and the WebAssembly
# codecs the worker loads (JPEG 2000, HTJ2K, JPEG-LS, JPEG baseline), and THIRD_PARTY_LICENSES.txt (the
# licence of every package bundled). node_modules stays here (gitignored).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$here/../../src/covidscan/service/static/vendor/cornerstone"
cd "$here"
npm ci --no-audit --no-fund
mkdir -p "$out"
# Node built-ins are required (some at load time) only for Node code paths: an empty module in the browser.
common=(--alias:fs=./node-shim.cjs --alias:path=./node-shim.cjs --alias:events=./node-shim.cjs --alias:crypto=./node-shim.cjs --alias:module=./node-shim.cjs --alias:url=./node-shim.cjs --alias:worker_threads=./node-shim.cjs --bundle --format=esm --minify --target=es2020 --legal-comments=none --log-level=warning)
meta="$(mktemp -d)"
npx esbuild entry.js "${common[@]}" --metafile="$meta/main.json" --outfile="$out/cornerstone.js"
npx esbuild node_modules/@cornerstonejs/dicom-image-loader/dist/esm/decodeImageFrameWorker.js \
  "${common[@]}" --metafile="$meta/worker.json" --outfile="$out/decodeImageFrameWorker.js"
node licenses.js "$out/THIRD_PARTY_LICENSES.txt" "$meta/main.json" "$meta/worker.json"
rm -r "$meta"
# JPEG-XL (1 MB of WebAssembly, a transfer syntax scanners hardly write) is left out on purpose.
for wasm in codec-openjpeg/dist/openjpegwasm_decode.wasm codec-openjph/dist/openjphjs.wasm \
    codec-charls/dist/charlswasm_decode.wasm codec-libjpeg-turbo-8bit/dist/libjpegturbowasm_decode.wasm; do
  cp "node_modules/@cornerstonejs/$wasm" "$out/"
done
ls -l "$out"
