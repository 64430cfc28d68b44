//! kad's directory on bpffs: mounting bpffs where it is missing, the lock that gives the
//! directory to one daemon, replacing a pin, what earlier designs pinned, and `kad uninstall`.
use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use keepalive_common::{COUNTS_MAP, HZ_MAP, LISTENERS_MAP, MARKS_MAP, PATHS_MAP, POLICIES_MAP};
use tracing::info;

use super::{bpfsys, KernelError};
use crate::host::pathio::{io_err, remove_file_if_present, PathIoError};

pub(super) const ANCHORS_DIR: &str = "anchors";
pub(super) const TRACING_DIR: &str = "tracing";
/// What the first design pinned: one link per policy cgroup, and its maps; and what earlier
/// builds of this design pinned: per-socket state (`KAD_SOCK`), counters by cgroup id
/// (`KAD_COUNTERS`, now an array by slot).
pub(super) const LEGACY_LINKS_DIR: &str = "links";
const LEGACY_MAPS: [&str; 4] = ["KAD_POLICIES", "KAD_STATS", "KAD_SOCK", "KAD_COUNTERS"];
/// The maps pinned in the directory (the others live as long as the daemon).
pub(super) const PINNED_MAPS: [&str; 6] = [
    POLICIES_MAP,
    PATHS_MAP,
    COUNTS_MAP,
    MARKS_MAP,
    LISTENERS_MAP,
    HZ_MAP,
];
const DEFAULT_BPFFS_MOUNT: &str = "/sys/fs/bpf";
/// `BPF_FS_MAGIC` from include/uapi/linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The device of the bpf filesystem this daemon mounted outside the host's namespaces, if it
/// did: only this process knows it will go with them.
static PRIVATE_MOUNT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

/// `PROC_PID_INIT_INO`: the initial PID namespace's inode number, fixed by the kernel.
const INIT_PID_NS: &str = "pid:[4026531836]";

/// Whether a mount this daemon makes lands where the host's pid 1 sees it: the daemon is in
/// the initial PID namespace (so /proc/1 is the host's init) and in pid 1's mount namespace.
fn in_host_namespaces() -> bool {
    let link = |p: &str| std::fs::read_link(p).ok();
    let initial_pid = link("/proc/self/ns/pid").is_some_and(|ns| ns == Path::new(INIT_PID_NS));
    let own_mnt = link("/proc/self/ns/mnt");
    initial_pid && own_mnt.is_some() && own_mnt == link("/proc/1/ns/mnt")
}

/// bpffs must be mounted on the nearest existing ancestor of `dir`. When that ancestor is
/// `/sys/fs/bpf` itself (the usual place, unmounted on some hosts), it is mounted, unless that
/// mount would not outlive the daemon's namespaces and `private_ok` is not given: that is
/// refused before anything is mounted.
pub(super) fn ensure_bpffs(dir: &Path, private_ok: bool) -> Result<(), KernelError> {
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or_else(|| Path::new("/"));
    let on_bpffs = |path: &Path| {
        crate::host::cgroup::is_fs(path, BPF_FS_MAGIC).map_err(io_err("cannot stat", path))
    };
    if on_bpffs(existing)? {
        return own_dir(dir);
    }
    if existing == Path::new(DEFAULT_BPFFS_MOUNT) {
        let private = !in_host_namespaces();
        if private && !private_ok {
            return Err(KernelError::PrivateBpffs(dir.to_path_buf()));
        }
        if mount_bpffs(existing).is_ok() && on_bpffs(existing)? {
            info!("mounted bpffs at {DEFAULT_BPFFS_MOUNT}");
            if private {
                use std::os::unix::fs::MetadataExt as _;
                let dev = std::fs::metadata(existing)
                    .map_err(io_err("cannot stat", existing))?
                    .dev();
                let _ = PRIVATE_MOUNT.set(dev);
            }
            return own_dir(dir);
        }
    }
    if existing == dir {
        return Err(KernelError::NotBpffs {
            dir: dir.to_path_buf(),
        });
    }
    Err(KernelError::NoBpffs {
        dir: dir.to_path_buf(),
        mount: existing.to_path_buf(),
    })
}

/// kad's directory must be one of its own, not the root of a bpf filesystem: kad removes the
/// directory at `uninstall`, and other programs pin beside it.
pub fn own_dir(dir: &Path) -> Result<(), KernelError> {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(meta) = std::fs::metadata(dir) else {
        return Ok(()); // made below the mount by kad
    };
    let parent = dir.join("..");
    let root = match std::fs::metadata(&parent) {
        Ok(up) => up.dev() != meta.dev() || up.ino() == meta.ino(),
        Err(e) => return Err(io_err("cannot stat", &parent)(e).into()),
    };
    if root {
        return Err(KernelError::BpffsRoot(dir.to_path_buf()));
    }
    Ok(())
}

/// Whether the bpf filesystem holding `dir` outlives this daemon: not one the daemon mounted
/// outside the host's namespaces, and the daemon runs in pid 1's mount namespace, or that
/// namespace has the same bpf filesystem mounted (by device number). In a PID namespace of its
/// own, pid 1 is not the host's: a bpf filesystem found there (a container's `hostPath`) is
/// trusted. One that only this daemon's mount namespace holds is freed with the namespace, and
/// its pins with it: every attachment goes.
pub fn outlives_daemon(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(meta) = std::fs::metadata(dir) else {
        return false;
    };
    if PRIVATE_MOUNT.get() == Some(&meta.dev()) {
        return false;
    }
    let own = std::fs::read_link("/proc/self/ns/mnt");
    if own.is_ok() && own.ok() == std::fs::read_link("/proc/1/ns/mnt").ok() {
        return true;
    }
    let dev = format!("{}:{}", libc::major(meta.dev()), libc::minor(meta.dev()));
    let Ok(host) = std::fs::read_to_string("/proc/1/mountinfo") else {
        return false;
    };
    host.lines().any(|line| {
        // "id parent major:minor root mount-point options [tags] - fstype source options"
        let mut halves = line.splitn(2, " - ");
        let (Some(head), Some(tail)) = (halves.next(), halves.next()) else {
            return false;
        };
        head.split(' ').nth(2) == Some(dev.as_str()) && tail.split(' ').next() == Some("bpf")
    })
}

fn mount_bpffs(at: &Path) -> io::Result<()> {
    let target = std::ffi::CString::new(at.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: NUL-terminated strings that outlive the call; no data argument.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub(super) fn lock_dir(dir: &Path) -> Result<File, KernelError> {
    let file = File::open(dir).map_err(io_err("cannot open", dir))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(KernelError::Busy(dir.to_path_buf()));
        }
        return Err(io_err("cannot lock", dir)(err).into());
    }
    Ok(file)
}

/// Pins `fd` at `path`, replacing what is there (rename over it: never a moment without).
pub(super) fn replace_pin(fd: &OwnedFd, path: &Path) -> io::Result<()> {
    // bpffs refuses names with dots.
    let mut tmp = path.as_os_str().to_os_string();
    tmp.push("-new");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    bpfsys::pin(fd.as_fd(), &tmp)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Detaches what the first design of kad pinned (one link per policy cgroup, and its
/// maps), once this design's anchors are in place.
pub(super) fn retire_legacy(dir: &Path) -> usize {
    let links = dir.join(LEGACY_LINKS_DIR);
    let mut count = 0;
    if let Ok(entries) = std::fs::read_dir(&links) {
        for entry in entries.flatten() {
            if std::fs::remove_file(entry.path()).is_ok() {
                count += 1;
            }
        }
        let _ = std::fs::remove_dir(&links);
    }
    for name in LEGACY_MAPS {
        let _ = std::fs::remove_file(dir.join(name));
    }
    count
}

/// Detaches everything kad pinned under `dir` and removes the directory. Refuses while a daemon
/// holds the directory. Returns the number of anchors detached.
pub fn uninstall(dir: &Path) -> Result<usize, KernelError> {
    if !dir.exists() {
        return Ok(0);
    }
    own_dir(dir)?;
    let lock = lock_dir(dir)?;
    let mut count = 0;
    let anchors = dir.join(ANCHORS_DIR);
    if let Ok(entries) = std::fs::read_dir(&anchors) {
        for entry in entries.flatten() {
            remove_tree(&entry.path())?;
            count += 1;
        }
    }
    for sub in [ANCHORS_DIR, TRACING_DIR, LEGACY_LINKS_DIR] {
        remove_tree(&dir.join(sub))?;
    }
    for name in PINNED_MAPS.into_iter().chain(LEGACY_MAPS) {
        remove_file_if_present(&dir.join(name))?;
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(io_err("cannot remove (not kad's?)", dir)(e).into())
        }
        _ => {}
    }
    drop(lock);
    Ok(count)
}

/// Removes a directory of pins (one level of subdirectories), or a single pin.
fn remove_tree(path: &Path) -> Result<(), PathIoError> {
    let entries = match std::fs::read_dir(path) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
            return remove_file_if_present(path);
        }
        Err(e) => return Err(io_err("cannot read", path)(e)),
    };
    for entry in entries.flatten() {
        let p = entry.path();
        if p.is_dir() {
            remove_tree(&p)?;
        } else {
            remove_file_if_present(&p)?;
        }
    }
    match std::fs::remove_dir(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("cannot remove", path)(e)),
        _ => Ok(()),
    }
}
