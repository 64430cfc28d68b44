//! The Debian 12 image the scenarios boot: built once with mmdebstrap from Debian's packages
//! and cached under `target/system/image-HASH/`, HASH covering the package list, the mirrors
//! and the customize hook, so that a change to any of them builds a new image.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context as _, Result};

use crate::{kernels::debian::host_mirrors, run};

/// What the image holds beyond `--variant=apt`: systemd as PID 1, ifupdown (Debian's network
/// configuration: its networking.service pulls network.target in at boot, so that "After=
/// network.target" orders a service as on a real host), the real services the
/// scenarios put policies on (nginx, redis), the clients (curl, redis-cli from redis-server's
/// redis-tools, python3), bpftool to look at attachments, and bookworm's kernel with what
/// building its initramfs needs.
const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "iproute2",
    "ifupdown",
    "procps",
    "kmod",
    "nginx-light",
    "redis-server",
    "python3",
    "curl",
    "bpftool",
    "linux-image-amd64",
    "initramfs-tools",
    "zstd",
];
const CUSTOMIZE: &str = include_str!("customize.sh");
/// Written before the kernels are installed, so that their first initramfs is small too.
const ESSENTIAL_HOOK: &str = "mkdir -p \"$1/etc/initramfs-tools/conf.d\" && \
     echo MODULES=list > \"$1/etc/initramfs-tools/conf.d/kad-vm\"";
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
/// The disk's size; the file is sparse and each boot writes to an overlay.
const DISK_SIZE: &str = "3G";

/// A kernel of the image, booted with `-kernel` and `-initrd`.
pub(super) struct Kernel {
    /// "6.1", "6.12".
    pub(super) series: String,
    pub(super) vmlinuz: PathBuf,
    pub(super) initrd: PathBuf,
}

pub(super) struct Image {
    /// The raw ext4 disk, the backing file of each boot's overlay.
    pub(super) disk: PathBuf,
    pub(super) kernels: Vec<Kernel>,
}

impl Image {
    pub(super) fn kernel(&self, series: &str) -> Result<&Kernel> {
        self.kernels
            .iter()
            .find(|k| k.series == series)
            .with_context(|| format!("the image has no {series} kernel"))
    }
}

/// The image for the current package list and hook, built if it is not in the cache.
pub(super) fn image(work: &Path) -> Result<Image> {
    let mirrors = host_mirrors()?;
    if mirrors.codename != "bookworm" {
        eprintln!(
            "xtask: note: the host is {}; the image is Debian 12 (bookworm) from the same mirrors",
            mirrors.codename
        );
    }
    let sources = [
        format!(
            "deb [signed-by={KEYRING}] {} bookworm main",
            mirrors.archive
        ),
        format!(
            "deb [signed-by={KEYRING}] {} bookworm-updates main",
            mirrors.archive
        ),
        format!(
            "deb [signed-by={KEYRING}] {} bookworm-security main",
            mirrors.security
        ),
        format!(
            "deb [signed-by={KEYRING}] {} bookworm-backports main",
            mirrors.archive
        ),
    ];
    let key = format!(
        "{:016x}",
        fnv1a(&[
            PACKAGES.join(" ").as_str(),
            CUSTOMIZE,
            ESSENTIAL_HOOK,
            DISK_SIZE,
            &sources.join("\n"),
        ])
    );
    let dir = work.join(format!("image-{key}"));
    if !dir.join("complete").exists() {
        build(work, &dir, &sources)?;
    }
    let disk = dir.join("disk.img");
    let mut kernels = Vec::new();
    for entry in fs::read_dir(&dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(release) = name.strip_prefix("vmlinuz-") else {
            continue;
        };
        let series = release.split('.').take(2).collect::<Vec<_>>().join(".");
        kernels.push(Kernel {
            series,
            vmlinuz: entry.path(),
            initrd: dir.join(format!("initrd.img-{release}")),
        });
    }
    Ok(Image { disk, kernels })
}

fn build(work: &Path, dir: &Path, sources: &[String]) -> Result<()> {
    // Older images (another package list or hook) are not needed any more.
    for entry in fs::read_dir(work)?.flatten() {
        if entry.file_name().to_string_lossy().starts_with("image-") {
            fs::remove_dir_all(entry.path())
                .with_context(|| format!("remove {}", entry.path().display()))?;
        }
    }
    fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
    let start = Instant::now();
    let rootfs = dir.join("rootfs");
    let hook = dir.join("customize.sh");
    fs::write(&hook, CUSTOMIZE).with_context(|| format!("write {}", hook.display()))?;
    eprintln!(
        "xtask: building the Debian 12 image in {} (mmdebstrap, a few minutes)",
        dir.display()
    );
    run(Command::new("mmdebstrap")
        .args(["--variant=apt", "--quiet"])
        .arg(format!("--include={}", PACKAGES.join(",")))
        .arg(format!("--essential-hook={ESSENTIAL_HOOK}"))
        .arg(format!("--customize-hook=sh '{}' \"$1\"", hook.display()))
        .arg("bookworm")
        .arg(&rootfs)
        .args(sources))?;
    let built = start.elapsed().as_secs();
    let boot = rootfs.join("boot");
    let mut releases = Vec::new();
    for entry in fs::read_dir(&boot)
        .with_context(|| format!("read {}", boot.display()))?
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(release) = name.strip_prefix("vmlinuz-") {
            for file in [name.clone(), format!("initrd.img-{release}")] {
                fs::copy(boot.join(&file), dir.join(&file))
                    .with_context(|| format!("copy {file} out of the image"))?;
            }
            releases.push(release.to_string());
        }
    }
    if releases.len() < 2 {
        bail!("the image holds kernels {releases:?}; expected bookworm's 6.1 and 6.12");
    }
    let disk = dir.join("disk.img");
    run(Command::new("truncate").args(["-s", DISK_SIZE]).arg(&disk))?;
    // mke2fs copies the tree in: no loop device, no mount.
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "kadvm", "-d"])
        .arg(&rootfs)
        .arg(&disk))?;
    fs::remove_dir_all(&rootfs).with_context(|| format!("remove {}", rootfs.display()))?;
    fs::write(dir.join("complete"), "")?;
    eprintln!(
        "xtask: image built in {} s (mmdebstrap {built} s), kernels {}",
        start.elapsed().as_secs(),
        releases.join(" ")
    );
    Ok(())
}

/// FNV-1a (64 bits) over `parts`, each followed by a 0 byte: stable from one build of xtask
/// to the next, unlike std's hasher.
fn fnv1a(parts: &[&str]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in part.as_bytes().iter().chain(&[0]) {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_key_follows_every_input() {
        assert_eq!(fnv1a(&[]), 0xcbf2_9ce4_8422_2325);
        assert_ne!(fnv1a(&["a", "b"]), fnv1a(&["ab"]));
        assert_ne!(fnv1a(&["nginx-light"]), fnv1a(&["nginx-light "]));
        assert_eq!(fnv1a(&["x", "y"]), fnv1a(&["x", "y"]));
    }
}
