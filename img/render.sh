#!/usr/bin/env bash
# Renders the diagrams of img/ from their text sources: *.dot with Graphviz, *.puml with PlantUML, each to an
# SVG and a PNG beside its source. Installs the two tools (and the DejaVu fonts the sources name) from
# Debian's packages when they are missing. Run from anywhere: img/render.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

missing=()
command -v dot >/dev/null || missing+=(graphviz)
command -v plantuml >/dev/null || missing+=(plantuml)
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

shopt -s nullglob
for source in *.dot; do
  dot -Tsvg "$source" -o "${source%.dot}.svg"
  dot -Tpng -Gdpi=110 "$source" -o "${source%.dot}.png"
  echo "rendered ${source%.dot}.svg and .png"
done
for source in *.puml; do
  plantuml -tsvg "$source"
  plantuml -tpng "$source"
  echo "rendered ${source%.puml}.svg and .png"
done
