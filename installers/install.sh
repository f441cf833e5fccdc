#!/bin/sh
# install.sh: installs the Gleaner client on a Linux distribution without a Gleaner package (Debian
# and Ubuntu should use the .deb instead): the binary, the `gleaner` system user and group, the
# config, the state directory and the systemd units, and enables the system service. Idempotent.
#
# Usage (as root):
#   install.sh [--binary PATH] [--prefix /usr/local] [--no-enable]
#   install.sh --uninstall [--purge]
#
#   --binary PATH  the `gleaner` binary to install [default: ./gleaner beside this script, else
#                  target/release/gleaner of the source tree it is in]; the VM helper
#                  gleaner-vmhost beside it is installed too
#   --no-enable    install the units but do not enable or start the service
#   --uninstall    stop the service and desktop users' own daemons, remove Gleaner's containers and
#                  domains (`gleaner cleanup`), the binary and the units; keep the ledger, host key
#                  and config in /var/lib/gleaner and /etc/gleaner (and users' ~/.local/share/gleaner)
#   --purge        with --uninstall: also delete the ledger, host key, config, user and group
#
# Only Debian 12 is tested (by the project's CI, in a fresh root); the other families below follow
# the same steps with their own package-manager hints and are untested.
set -eu

prefix=/usr/local
binary=
enable=yes
uninstall=no
purge=no
here=$(cd "$(dirname "$0")" && pwd)

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
    --binary) [ $# -ge 2 ] || die "--binary needs a path"; binary=$2; shift ;;
    --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; prefix=$2; shift ;;
    --no-enable) enable=no ;;
    --uninstall) uninstall=yes ;;
    --purge) purge=yes ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
done
[ "$purge" = no ] || [ "$uninstall" = yes ] || die "--purge only goes with --uninstall"
[ "$(id -u)" = 0 ] || die "must run as root (it creates a system user and installs systemd units)"

# --- Which distribution, and how it installs the engines -----------------------------------------
[ -r /etc/os-release ] || die "cannot read /etc/os-release: unknown distribution, nothing installed"
# shellcheck disable=SC1091
. /etc/os-release
family=
for id in ${ID:-} ${ID_LIKE:-}; do
    case "$id" in
    debian|ubuntu) family=debian; break ;;
    fedora|rhel|centos|rocky|almalinux) family=fedora; break ;;
    opensuse*|suse|sles) family=suse; break ;;
    arch|manjaro) family=arch; break ;;
    esac
done
case "$family" in
debian) docker_hint="apt-get install docker.io (libvirt: apt-get install libvirt-daemon-system)" ;;
fedora) docker_hint="dnf install moby-engine, or Docker CE from docker.com (libvirt: dnf install libvirt-daemon-kvm)" ;;
suse) docker_hint="zypper install docker (libvirt: zypper install libvirt-daemon-qemu)" ;;
arch) docker_hint="pacman -S docker (libvirt: pacman -S libvirt qemu-base)" ;;
*) die "distribution '${ID:-unknown}' (${PRETTY_NAME:-no PRETTY_NAME}) is not one this script knows (Debian, Ubuntu, Fedora, RHEL and rebuilds, openSUSE, Arch); nothing installed. Install by hand as docs/guides/install.md describes." ;;
esac
[ "$family" = debian ] && [ "$uninstall" = no ] && say "note: on ${PRETTY_NAME:-$ID} the gleaner-client .deb is the better way (upgrades, conffiles); continuing"
command -v systemctl >/dev/null || die "systemd not found: Gleaner's service needs systemd (OpenRC, runit and s6 are not supported); nothing installed"

unit_dir=/etc/systemd/system
user_unit_dir=/etc/systemd/user
systemd_running=no
[ -d /run/systemd/system ] && systemd_running=yes

in_group() { id -nG "$1" 2>/dev/null | tr ' ' '\n' | grep -qx "$2"; }

# --- Uninstall -----------------------------------------------------------------------------------
if [ "$uninstall" = yes ]; then
    if [ "$systemd_running" = yes ]; then
        systemctl disable --now gleaner.service >/dev/null 2>&1 || true
    else
        systemctl disable gleaner.service >/dev/null 2>&1 || true
    fi
    bin=$prefix/bin/gleaner
    if [ -x "$bin" ]; then
        if "$bin" cleanup --help >/dev/null 2>&1; then
            if [ "$purge" = yes ]; then "$bin" cleanup --purge || say "cleanup failed; see above"
            else "$bin" cleanup || say "cleanup failed; see above"; fi
        elif [ -f /var/lib/gleaner/host.key ] && command -v docker >/dev/null; then
            owner=$("$bin" key show /var/lib/gleaner/host.key 2>/dev/null | awk '$1 == "id" { print $2 }')
            if [ -n "$owner" ]; then
                for c in $(docker ps -aq --filter "label=org.gleaner.owner=$owner" 2>/dev/null); do
                    docker rm -f "$c" >/dev/null 2>&1 || say "could not remove container $c"
                done
            fi
        fi
    fi
    # Desktop users' own daemons (the user unit): stopped and their machines removed as that user,
    # their ~/.local/share/gleaner kept (as the .deb's prerm does).
    if [ -x "$bin" ] && "$bin" cleanup --help >/dev/null 2>&1; then
        getent passwd | while IFS=: read -r name _ uid gid _ home _; do
            case "$uid" in *[!0-9]*|'') continue ;; esac
            if [ "$uid" -lt 1000 ] || [ "$uid" -eq 65534 ]; then continue; fi
            [ -f "$home/.local/share/gleaner/host.key" ] || continue
            if [ "$systemd_running" = yes ]; then
                systemctl --user -M "$name@" stop gleaner.service >/dev/null 2>&1 || true
            fi
            setpriv --reuid "$name" --regid "$gid" --init-groups \
                env -i HOME="$home" PATH=/usr/sbin:/usr/bin:/sbin:/bin XDG_RUNTIME_DIR="/run/user/$uid" \
                "$bin" cleanup --state-dir "$home/.local/share/gleaner" --socket "/run/user/$uid/gleaner/control.sock" ||
                say "cleanup of $name's desktop daemon failed; see above"
        done
    fi
    rm -f "$bin" "$prefix/bin/gleaner-vmhost" "$unit_dir/gleaner.service" "$user_unit_dir/gleaner.service"
    [ "$systemd_running" = yes ] && systemctl daemon-reload
    if [ "$purge" = yes ]; then
        rm -rf /var/lib/gleaner /etc/gleaner /run/gleaner
        getent passwd gleaner >/dev/null && userdel gleaner
        if getent group gleaner >/dev/null; then groupdel gleaner; fi
        say "uninstalled and purged (ledger, host key, config, user and group deleted)"
    else
        say "uninstalled; kept /var/lib/gleaner (ledger, host key) and /etc/gleaner (config): --uninstall --purge deletes them"
    fi
    exit 0
fi

# --- Install -------------------------------------------------------------------------------------
if [ -z "$binary" ]; then
    for b in "$here/gleaner" "$here/../target/release/gleaner"; do
        [ -x "$b" ] && binary=$b && break
    done
    [ -n "$binary" ] || die "no gleaner binary beside this script or in target/release; build it (cargo build --release -p gleaner-client) or pass --binary PATH"
fi
[ -x "$binary" ] || die "$binary is not an executable file"
# The VM helper ships beside the binary; it alone links the libvirt client library (VMs): install
# that when it is missing. Without the helper, containers still run and `gleaner doctor` says so.
vmhost=$(dirname "$binary")/gleaner-vmhost
if [ ! -x "$vmhost" ]; then
    say "note: no gleaner-vmhost beside $binary: VM machine types will be refused (containers run)"
    vmhost=
elif ldd "$vmhost" 2>/dev/null | grep -q 'libvirt.so.0 => not found'; then
    say "installing the libvirt client library that gleaner-vmhost links (VMs)"
    case "$family" in
    debian) { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libvirt0 ca-certificates >/dev/null; } ||
        die "could not install libvirt0 (apt-get install libvirt0); nothing installed" ;;
    fedora) dnf install -y -q libvirt-libs || die "could not install libvirt-libs (dnf); nothing installed" ;;
    suse) zypper -n install libvirt-libs || die "could not install libvirt-libs (zypper); nothing installed" ;;
    arch) pacman -S --noconfirm --needed libvirt || die "could not install libvirt (pacman); nothing installed" ;;
    esac
fi
version=$("$binary" --version 2>&1) || die "$binary does not run here ($version): wrong architecture or C library?"
for tool in useradd groupadd usermod getent install; do
    command -v "$tool" >/dev/null || die "$tool not found (shadow-utils/passwd and coreutils are needed); nothing installed"
done

units=$here/systemd
conf=$here/config/client.toml
if [ ! -f "$units/gleaner.service" ] || [ ! -f "$conf" ]; then
    die "installers/systemd and installers/config must sit beside this script"
fi

install -d -m 0755 "$prefix/bin"
install -m 0755 "$binary" "$prefix/bin/gleaner.new"
mv -f "$prefix/bin/gleaner.new" "$prefix/bin/gleaner"
if [ -n "$vmhost" ]; then
    install -m 0755 "$vmhost" "$prefix/bin/gleaner-vmhost.new"
    mv -f "$prefix/bin/gleaner-vmhost.new" "$prefix/bin/gleaner-vmhost"
fi

getent group gleaner >/dev/null || groupadd --system gleaner
if ! getent passwd gleaner >/dev/null; then
    nologin=$(command -v nologin || echo /sbin/nologin)
    useradd --system --gid gleaner --home-dir /var/lib/gleaner --no-create-home \
        --shell "$nologin" --comment "Gleaner factory daemon" gleaner
fi
for g in docker libvirt; do
    if getent group "$g" >/dev/null && ! in_group gleaner "$g"; then usermod -a -G "$g" gleaner; fi
done
install -d -o gleaner -g gleaner -m 0750 /var/lib/gleaner
install -d -m 0755 /etc/gleaner
# The admin's config is never overwritten.
if [ ! -f /etc/gleaner/client.toml ]; then
    install -o root -g gleaner -m 0640 "$conf" /etc/gleaner/client.toml
fi

# The units name /usr/bin/gleaner; point them at the installed binary.
install -d -m 0755 "$unit_dir" "$user_unit_dir"
sed "s#/usr/bin/gleaner #$prefix/bin/gleaner #" "$units/gleaner.service" >"$unit_dir/gleaner.service"
sed "s#/usr/bin/gleaner #$prefix/bin/gleaner #" "$units/gleaner-user.service" >"$user_unit_dir/gleaner.service"
chmod 0644 "$unit_dir/gleaner.service" "$user_unit_dir/gleaner.service"

if [ "$enable" = yes ]; then
    if [ "$systemd_running" = yes ]; then
        systemctl daemon-reload
        systemctl enable gleaner.service
        systemctl restart gleaner.service || say "gleaner.service did not start: journalctl -u gleaner"
    else
        # A chroot, a container or an image build: enable now, it starts on the next boot.
        systemctl enable gleaner.service >/dev/null 2>&1 || die "systemctl enable gleaner.service failed"
        say "systemd is not running here: gleaner.service is enabled and starts on the next boot"
    fi
fi

say "installed $version as $prefix/bin/gleaner on ${PRETTY_NAME:-$ID}"
if ! getent group docker >/dev/null; then
    say "no docker group: Docker Engine seems absent, and Gleaner runs no containers without it: $docker_hint; then run install.sh again so the gleaner user joins the docker group"
fi
say "settings: /etc/gleaner/client.toml; check the host with: $prefix/bin/gleaner doctor"
