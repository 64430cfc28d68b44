#!/bin/sh
# mmdebstrap's customize hook for the test-system image ($1: its root filesystem, on the host).
# Everything the image holds beyond Debian's packages is here: its hash names the cached image.
set -eu
root="$1"
in_root() { chroot "$root" env DEBIAN_FRONTEND=noninteractive "$@"; }

# bookworm-backports' 6.12 beside bookworm's 6.1 (kept installed): the image boots either.
in_root apt-mark manual $(in_root dpkg-query -W -f '${Package}\n' 'linux-image-6.1.*')
in_root apt-get install -y -q --no-install-recommends -t bookworm-backports linux-image-amd64

# Debian's kernels build these as modules: an initramfs with only them (MODULES=list is set
# by the essential hook, before the kernels are installed).
printf '%s\n' virtio_pci virtio_blk ext4 9p 9pnet_virtio virtio_rng >> "$root/etc/initramfs-tools/modules"
in_root update-initramfs -u -k all

echo kadvm > "$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 kadvm\n::1 localhost\n' > "$root/etc/hosts"
# The disk is virtio's first; the host shares a directory of its own for each boot.
mkdir -p "$root/share"
cat > "$root/etc/fstab" <<'FSTAB'
/dev/vda / ext4 rw,errors=remount-ro 0 1
share /share 9p trans=virtio,version=9p2000.L,msize=524288,nofail 0 0
FSTAB

# Nothing that wakes up on its own during a run.
for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer \
    man-db.timer systemd-tmpfiles-clean.timer; do
    ln -sf /dev/null "$root/etc/systemd/system/$unit"
done

# The driver: once the system is up, runs /share/run.sh, leaves its exit code, output and the
# journal on the share, and powers off (QEMU runs with -no-reboot: it exits).
cat > "$root/usr/local/sbin/kad-vm-driver" <<'DRIVER'
#!/bin/sh
systemctl is-system-running --wait > /share/system-state 2>&1
uname -r > /share/release
cd /share
bash /share/run.sh > /share/output 2>&1
code=$?
journalctl -b --no-pager -o short-precise > /share/journal 2>&1
echo "$code" > /share/exit
sync
systemctl poweroff
DRIVER
chmod 0755 "$root/usr/local/sbin/kad-vm-driver"
cat > "$root/etc/systemd/system/kad-vm-driver.service" <<'UNIT'
[Unit]
Description=kad test-system driver: runs /share/run.sh, then powers off
ConditionPathExists=/share/run.sh
RequiresMountsFor=/share
After=multi-user.target

[Service]
# exec, not oneshot: its start job ends at once, so the system reaches "running" and the
# script can wait for it.
Type=exec
ExecStart=/usr/local/sbin/kad-vm-driver
StandardOutput=journal+console

[Install]
WantedBy=multi-user.target
UNIT
ln -sf /etc/systemd/system/kad-vm-driver.service \
    "$root/etc/systemd/system/multi-user.target.wants/kad-vm-driver.service"

