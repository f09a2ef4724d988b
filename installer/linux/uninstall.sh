#!/bin/sh
# Remove what install.sh installed (listed in its manifest). Settings, data and logs stay.
set -eu

prefix="$HOME/.local"
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix=$2; shift ;;
    -h|--help) echo "usage: uninstall.sh [--prefix DIR]"; exit 0 ;;
    *) echo "usage: uninstall.sh [--prefix DIR]" >&2; exit 2 ;;
  esac
  shift
done
# Run from the installed copy, the manifest sits next to this script.
here=$(cd "$(dirname "$0")" && pwd)
manifest="$here/install-manifest"
[ -f "$manifest" ] || manifest="$prefix/lib/hivemind-worker/install-manifest"
if [ ! -f "$manifest" ]; then
  echo "HiveMind Worker is not installed under $prefix (no install-manifest)" >&2
  exit 1
fi

# Read it all first: the manifest lists itself.
entries=$(cat "$manifest")
# Files first, then the directories install.sh created, deepest first, only if empty.
printf '%s\n' "$entries" | grep '^file ' | cut -c6- | while IFS= read -r f; do
  rm -f -- "$f"
done
# Whole folders install.sh owns (the app's _internal/); never anything else, whatever the
# manifest says.
printf '%s\n' "$entries" | grep '^tree ' | cut -c6- | while IFS= read -r t; do
  case "$t" in
    */hivemind-worker/_internal) rm -rf -- "$t" ;;
  esac
done
printf '%s\n' "$entries" | grep '^dir ' | cut -c5- | sort -r | while IFS= read -r d; do
  rmdir -- "$d" 2>/dev/null || true
done
# The app's "Start at login" setting may have written an autostart entry since; it would
# now point at nothing.
autostart="${XDG_CONFIG_HOME:-$HOME/.config}/autostart/hivemind-worker.desktop"
if [ -f "$autostart" ] && grep -q "^Exec=$here/hivemind-worker" "$autostart"; then
  rm -f -- "$autostart"
fi
echo "Removed HiveMind Worker. Your settings and data are kept (~/.config/hivemind-worker,"
echo "~/.local/share/hivemind-worker); delete them yourself if you want them gone."
