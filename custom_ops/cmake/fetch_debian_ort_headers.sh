#!/bin/sh
# Copy onnxruntime's C/C++ headers from Debian 13 (trixie)'s libonnxruntime-dev into DEST.
#
# Uses a private apt configuration (own state, cache and sources; empty dpkg status) for the
# trixie suite on the machine's own configured Debian mirror, downloads the package and unpacks
# it with dpkg -x: nothing is installed on the system. Usage: fetch_debian_ort_headers.sh DEST
set -eu

dest=${1:?usage: $0 DEST}
command -v apt-get >/dev/null && command -v dpkg >/dev/null || {
  echo "apt-get and dpkg are needed (a Debian system)" >&2
  exit 1
}

# The first configured Debian archive URI (deb822 .sources files, then one-line sources.list).
mirror=$(
  {
    cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
      awk '$1 == "URIs:" { for (i = 2; i <= NF; i++) print $i }'
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
      sed -n 's/^[[:space:]]*deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]\+\).*/\2/p'
  } | grep -E '/debian/?$' | head -n 1
)
[ -n "$mirror" ] || {
  echo "no Debian mirror found in /etc/apt/sources.list{,.d}" >&2
  exit 1
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/archives/partial" "$work/sources" "$work/preferences"
cat >"$work/sources/trixie.sources" <<SOURCES
Types: deb
URIs: $mirror
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
cat >"$work/apt.conf" <<CONF
Dir::State "$work";
Dir::State::Lists "$work/lists";
Dir::State::status "/dev/null";
Dir::Cache "$work";
Dir::Cache::Archives "$work/archives";
Dir::Etc::SourceList "/dev/null";
Dir::Etc::SourceParts "$work/sources";
Dir::Etc::Preferences "/dev/null";
Dir::Etc::PreferencesParts "$work/preferences";
APT::Sandbox::User "$(id -un)";
CONF
export APT_CONFIG="$work/apt.conf"

apt-get -qq update
(cd "$work" && apt-get -qq download libonnxruntime-dev)
dpkg -x "$work"/libonnxruntime-dev_*.deb "$work/root"
mkdir -p "$dest"
cp -R "$work/root/usr/include/onnxruntime/." "$dest/"
basename "$work"/libonnxruntime-dev_*.deb
