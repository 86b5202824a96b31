#!/usr/bin/env bash
# Install, upgrade or remove one standby role on this machine.
#
#   systemd/install.sh --role ps    [--host NAME]... [--port 9443] [--listen ADDR] [--cache-quota 10G]
#   systemd/install.sh --role mt    --server HOST[:PORT] --fingerprint sha256:... --passphrase-file FILE
#                                   [--retention-dir /mnt/retention] [--shared-volume]
#   systemd/install.sh --role agent --server HOST[:PORT] --fingerprint sha256:... --passphrase-file FILE
#                                   [--disk NAME=PATH]... [--allow-full-scan]
#   systemd/install.sh --role ROLE --uninstall [--purge]
#
# Common: [--name NAME] [--from SOURCE_TREE_OR_WHEEL] [--python python3] [--system-site-packages]
#         [--no-start] [--root DIR]
#   --system-site-packages: the venv also sees this Python's packages (dependencies from Debian packages,
#   no download); --no-start: install and enroll, leave the service stopped.
#
# Where things go: the software in a venv, /opt/standby/venv; the state (identity, keys, config, cache or
# journal index) in /var/lib/standby/<role>, with the role's config linked from /etc/standby/<role>.toml;
# the unit in /etc/systemd/system/standby-<role>.service. --root DIR puts all of it under DIR (tests).
#
# Re-running it upgrades in place: the software is replaced, the state and the identity are kept (no new
# enrollment, no resync), and a running service is restarted. --uninstall removes the software and the
# unit and keeps the state; --purge removes the state too (identity, keys: the machine must enroll again).
# Every check comes before anything is changed, and a refusal says what is wrong and what to do.
set -euo pipefail

prog=$(basename "$0")
here=$(cd "$(dirname "$0")" && pwd)

die() { echo "$prog: $*" >&2; exit 2; }
say() { echo "$prog: $*"; }

usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; }

role="" root="" from="$(dirname "$here")" python="python3" name="" sitepkgs="" start=1 uninstall="" purge=""
server="" fingerprint="" passfile="" retention="/mnt/retention" shared="" fullscan="" port=9443 listen="0.0.0.0"
quota="" hosts=() disks=()
while [ $# -gt 0 ]; do
  case "$1" in
    --role) role=${2:?}; shift ;;
    --root) root=${2:?}; shift ;;
    --from) from=${2:?}; shift ;;
    --python) python=${2:?}; shift ;;
    --name) name=${2:?}; shift ;;
    --system-site-packages) sitepkgs=1 ;;
    --no-start) start="" ;;
    --uninstall) uninstall=1 ;;
    --purge) purge=1 ;;
    --server) server=${2:?}; shift ;;
    --fingerprint) fingerprint=${2:?}; shift ;;
    --passphrase-file) passfile=${2:?}; shift ;;
    --retention-dir) retention=${2:?}; shift ;;
    --shared-volume) shared=1 ;;
    --allow-full-scan) fullscan=1 ;;
    --host) hosts+=("${2:?}"); shift ;;
    --port) port=${2:?}; shift ;;
    --listen) listen=${2:?}; shift ;;
    --cache-quota) quota=${2:?}; shift ;;
    --disk) disks+=("${2:?}"); shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
  shift
done

case "$role" in
  ps|mt|agent) ;;
  "") die "--role ps|mt|agent is required" ;;
  *) die "unknown role '$role': ps, mt or agent" ;;
esac
[ -n "$purge" ] && [ -z "$uninstall" ] && die "--purge goes with --uninstall"

opt="$root/opt/standby"
venv="$opt/venv"
state="$root/var/lib/standby/$role"
etc="$root/etc/standby"
unitdir="$root/etc/systemd/system"
unit="standby-$role.service"
cmd="standby-$role"
# systemd manages the service only on a machine it runs (PID 1) and never for a --root install.
systemd_here() { [ -z "$root" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; }

# ---- checks (nothing is changed before they all pass) -----------------------------------------------------

[ "$(id -u)" = 0 ] || die "run it as root: it installs under /opt, /etc and /var/lib and manages a service"

if [ -n "$uninstall" ]; then
  if systemd_here && systemctl list-unit-files "$unit" >/dev/null 2>&1; then
    systemctl disable --now "$unit" >/dev/null 2>&1 || true
  fi
  rm -f "$unitdir/$unit" "$etc/$role.toml"
  if systemd_here; then systemctl daemon-reload; fi
  # The venv is shared by the roles of one machine: it goes with the last of them.
  if ! compgen -G "$unitdir/standby-*.service" >/dev/null; then
    rm -rf "$opt"
  fi
  rmdir "$etc" 2>/dev/null || true
  if [ -n "$purge" ]; then
    rm -rf "$state"
    say "removed standby $role: software, unit and state ($state)"
  else
    say "removed standby $role's software and unit; its state stays in $state (--purge removes it)"
  fi
  exit 0
fi

command -v "$python" >/dev/null || die "$python not found: install Python 3.11 or newer (apt-get install python3 python3-venv)"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "$python is $("$python" -c 'import sys; print(sys.version.split()[0])'): standby needs Python 3.11 or newer"
"$python" -c 'import venv, ensurepip' 2>/dev/null || die "$python cannot make a venv: apt-get install python3-venv"
base=$("$python" -c 'import sys, os; print(os.path.realpath(sys.base_prefix))')
case "$base" in
  /root|/root/*|/home|/home/*)
    # The units hide /root and /home (ProtectHome=): a venv whose interpreter lives there cannot start.
    if [ -z "$root" ]; then
      die "$python lives in $base, which the services cannot see (ProtectHome=): use a system Python, e.g. \
--python /usr/bin/python3"
    fi
    ;;
esac
[ -e "$from" ] || die "--from $from does not exist (a source tree or a .whl)"
[ -d "$from" ] && [ ! -f "$from/pyproject.toml" ] && die "--from $from is not a source tree (no pyproject.toml)"
[ -f "$here/$unit" ] || die "$here/$unit is missing: run the script from a complete source tree"

fresh=1
[ -f "$state/$role.toml" ] && fresh=""

case "$role" in
  ps)
    if [ -n "$fresh" ]; then
      "$python" - "$listen" "$port" <<'EOF' || die "port $port is in use on $listen: stop what holds it, or pass --port"
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
EOF
    fi
    ;;
  mt|agent)
    if [ -n "$fresh" ]; then
      [ -n "$server" ] && [ -n "$fingerprint" ] && [ -n "$passfile" ] \
        || die "a new $role needs --server, --fingerprint and --passphrase-file (from 'standby-ps init')"
      [ -r "$passfile" ] || die "cannot read the passphrase file $passfile"
    fi
    ;;
esac
if [ "$role" = mt ] && [ -n "$fresh" ]; then
  [ -d "$retention" ] || die "the retention volume $retention does not exist: mount a volume of its own there \
(or pass --retention-dir DIR)"
fi
if [ "$role" = agent ] && [ -z "$fullscan" ]; then
  if [ ! -d /sys/kernel/tracing/events/block ] && ! grep -qw tracefs /proc/filesystems; then
    die "tracefs is not available here: the agent would track changes by scanning whole disks; pass \
--allow-full-scan to accept that"
  fi
fi
for d in ${disks[@]+"${disks[@]}"}; do
  case "$d" in *=*) ;; *) die "--disk $d: give NAME=PATH, e.g. sda=/dev/sda" ;; esac
  [ -e "${d#*=}" ] || die "--disk $d: ${d#*=} does not exist"
done

# ---- the software -----------------------------------------------------------------------------------------

upgrade=""
[ -x "$venv/bin/python" ] && upgrade=1
mkdir -p "$opt"
if [ -z "$upgrade" ]; then
  say "creating the venv $venv"
  "$python" -m venv ${sitepkgs:+--system-site-packages} "$venv"
fi
say "installing standby from $from"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$from"
# The same version number again (an upgrade from a newer tree of the same release): replaced all the same.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$from"
version=$("$venv/bin/$cmd" --version)

# ---- state, identity, config ------------------------------------------------------------------------------

if [ "$role" = ps ]; then
  # The process server's unit runs it as the system user standby (systemd hands it the state directory).
  if [ -n "$root" ]; then
    say "--root: the system user 'standby' the process server's unit runs as is not created"
  elif ! id standby >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/standby --shell /usr/sbin/nologin standby
    say "created the system user standby (the process server runs as it)"
  fi
fi
mkdir -p "$(dirname "$state")"
if [ -n "$fresh" ]; then
  case "$role" in
    ps)
      args=(init --dir "$state" --port "$port" --listen "$listen")
      [ -n "$name" ] && args+=(--name "$name")
      for h in ${hosts[@]+"${hosts[@]}"}; do args+=(--host "$h"); done
      [ -n "$quota" ] && args+=(--cache-quota "$quota")
      "$venv/bin/$cmd" "${args[@]}"
      ;;
    mt|agent)
      args=(enroll --dir "$state" --server "$server" --fingerprint "$fingerprint" --passphrase-file "$passfile")
      [ -n "$name" ] && args+=(--name "$name")
      [ "$role" = mt ] && args+=(--retention-dir "$retention")
      [ "$role" = mt ] && [ -n "$shared" ] && args+=(--shared-volume)
      "$venv/bin/$cmd" "${args[@]}"
      ;;
  esac
else
  say "keeping the state and identity in $state (an upgrade: nothing is enrolled again)"
fi
for d in ${disks[@]+"${disks[@]}"}; do
  if "$venv/bin/python" - "$state/agent.toml" "${d%%=*}" <<'EOF'; then
import sys, tomllib
disks = tomllib.load(open(sys.argv[1], "rb")).get("disks", [])
sys.exit(0 if any(x.get("name") == sys.argv[2] for x in disks) else 1)
EOF
    say "disk ${d%%=*} is already configured"
  else
    "$venv/bin/$cmd" add-disk "${d%%=*}" "${d#*=}" --dir "$state"
  fi
done
mkdir -p "$etc"
ln -sfn "$state/$role.toml" "$etc/$role.toml"

# ---- the unit ---------------------------------------------------------------------------------------------

mkdir -p "$unitdir"
# Under --root the unit names the paths under it (so a test can start exactly what the unit starts).
sed -e "s#/opt/standby#$opt#g" -e "s#/var/lib/standby#$root/var/lib/standby#g" "$here/$unit" > "$unitdir/$unit.new"
mv "$unitdir/$unit.new" "$unitdir/$unit"

run_cmd="$venv/bin/$cmd run --dir $state"
if systemd_here && [ -n "$start" ]; then
  systemctl daemon-reload
  if [ -n "$upgrade" ] && systemctl is-active --quiet "$unit"; then
    systemctl restart "$unit"
    say "$version installed; $unit restarted"
  else
    systemctl enable --now "$unit"
    say "$version installed; $unit enabled and started (journalctl -u $unit)"
  fi
else
  if systemd_here; then
    say "$version installed; start it with: systemctl enable --now $unit"
  elif [ -n "$upgrade" ]; then
    say "$version installed; systemd is not running here: restart the running $cmd with: $run_cmd"
  else
    say "$version installed; systemd is not running here: start it with: $run_cmd"
  fi
fi
