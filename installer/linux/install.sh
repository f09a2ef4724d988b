#!/bin/sh
# Install HiveMind Worker for the current user (no root): ~/.local/lib, ~/.local/bin,
# a desktop entry, icons, and with --autostart a login item. Run it again to upgrade.
set -eu

usage() {
  echo "usage: ./install.sh [--autostart] [--prefix DIR]"
  echo "  --autostart   start HiveMind Worker when you log in"
  echo "  --prefix DIR  install under DIR instead of ~/.local"
}

here=$(cd "$(dirname "$0")" && pwd)
prefix="$HOME/.local"
autostart=0
while [ $# -gt 0 ]; do
  case "$1" in
    --autostart) autostart=1 ;;
    --prefix) prefix=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
  shift
done

data_home=${XDG_DATA_HOME:-$prefix/share}
config_home=${XDG_CONFIG_HOME:-$HOME/.config}
app_dir="$prefix/lib/hivemind-worker"
manifest="$app_dir/install-manifest"

# Every file and directory this creates goes into the manifest, so uninstall.sh removes
# exactly those and never the person's settings, data or logs.
made=""
track() { made="$made$1
"; }
make_dir() {
  # Record the directories we create (top-down), so uninstall can remove them if empty.
  missing=""
  d=$1
  while [ ! -d "$d" ]; do missing="$d $missing"; d=$(dirname "$d"); done
  for d in $missing; do mkdir "$d"; track "dir $d"; done
}
put() {  # put SRC DEST MODE
  make_dir "$(dirname "$2")"
  cp "$1" "$2.tmp.$$" && chmod "$3" "$2.tmp.$$" && mv -f "$2.tmp.$$" "$2"
  track "file $2"
}

# An upgrade keeps what earlier installs recorded (say the autostart entry): all of it
# is still ours to remove.
previous=""
[ -f "$manifest" ] && previous=$(cat "$manifest")

# The one-folder app: the program and its _internal/ folder (Python, Qt, libraries). The
# folder is copied beside the old one and swapped in whole, so an upgrade never leaves a
# mix of two versions and a running copy keeps the files it has open.
make_dir "$app_dir"
rm -rf "$app_dir/_internal.new.$$"
cp -RP "$here/app/_internal" "$app_dir/_internal.new.$$"
[ -d "$app_dir/_internal" ] && mv "$app_dir/_internal" "$app_dir/_internal.old.$$"
mv "$app_dir/_internal.new.$$" "$app_dir/_internal"
rm -rf "$app_dir/_internal.old.$$"
track "tree $app_dir/_internal"
put "$here/app/hivemind-worker" "$app_dir/hivemind-worker" 755
put "$here/uninstall.sh" "$app_dir/uninstall.sh" 755
make_dir "$prefix/bin"
ln -sfn "$app_dir/hivemind-worker" "$prefix/bin/hivemind-worker"
track "file $prefix/bin/hivemind-worker"

for icon in "$here"/icons/*/hivemind-worker.png; do
  size=$(basename "$(dirname "$icon")")
  put "$icon" "$data_home/icons/hicolor/$size/apps/hivemind-worker.png" 644
done

# Desktop sessions often lack ~/.local/bin on PATH: point the entry at the binary itself.
entry="$here/hivemind-worker.desktop.tmp"
sed "s|^Exec=.*|Exec=$app_dir/hivemind-worker|" "$here/hivemind-worker.desktop" > "$entry"
put "$entry" "$data_home/applications/hivemind-worker.desktop" 644
if [ "$autostart" = 1 ]; then
  # The same entry the app's own "Start at login" setting writes (gui/autostart.py).
  sed -e "s|^Exec=.*|Exec=$app_dir/hivemind-worker gui --hidden|" \
      -e '$a X-GNOME-Autostart-enabled=true' "$entry" > "$entry.auto"
  put "$entry.auto" "$config_home/autostart/hivemind-worker.desktop" 644
  rm -f "$entry.auto"
fi
rm -f "$entry"

{ printf '%s\n' "$previous" | grep . || true; printf '%s' "$made"; } | awk '!seen[$0]++' > "$manifest.tmp"
echo "file $manifest" >> "$manifest.tmp"
mv -f "$manifest.tmp" "$manifest"

echo "Installed HiveMind Worker $("$app_dir/hivemind-worker" --version | awk '{print $NF}') in $app_dir"
case ":$PATH:" in
  *":$prefix/bin:"*) ;;
  *) echo "note: $prefix/bin is not on your PATH; add it to run \`hivemind-worker\` from a terminal" ;;
esac
echo "Uninstall with: $app_dir/uninstall.sh"
