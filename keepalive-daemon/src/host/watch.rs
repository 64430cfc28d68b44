//! inotify on cgroup2 directories: the daemon learns that a cgroup at a policy path (or a
//! directory on the way to it) was created or removed, without scanning anything.
use std::{
    collections::{BTreeSet, HashMap},
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::PathBuf,
    sync::{Arc, Mutex},
};

use tokio::io::unix::AsyncFd;

/// Cloned between the daemon's state, which sets the watches before it answers a request (so
/// that no event between the reply and a watch can be missed), and the task that reads events.
#[derive(Clone)]
pub struct Watcher {
    fd: Arc<AsyncFd<OwnedFd>>,
    watches: Arc<Mutex<Watches>>,
}

#[derive(Default)]
struct Watches {
    by_dir: HashMap<PathBuf, i32>,
    by_wd: HashMap<i32, PathBuf>,
}

impl Watcher {
    pub fn new() -> io::Result<Watcher> {
        // SAFETY: plain syscall; the descriptor is owned below.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Watcher {
            // SAFETY: the descriptor is owned by the AsyncFd and closed only when it drops.
            fd: Arc::new(unsafe { AsyncFd::register(fd)? }),
            watches: Arc::default(),
        })
    }

    /// Watches exactly `dirs` (adding and removing watches as needed). Directories that cannot
    /// be watched (gone meanwhile) are skipped: their parent's watch reports them. Returns
    /// whether a watch was added.
    pub fn set(&self, dirs: &BTreeSet<PathBuf>) -> bool {
        let mut added = false;
        let mut guard = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        let w = &mut *guard;
        let stale: Vec<PathBuf> = w
            .by_dir
            .keys()
            .filter(|d| !dirs.contains(*d))
            .cloned()
            .collect();
        for dir in stale {
            if let Some(wd) = w.by_dir.remove(&dir) {
                w.by_wd.remove(&wd);
                // SAFETY: removing a watch of our own descriptor.
                unsafe { libc::inotify_rm_watch(self.fd.get_ref().as_raw_fd(), wd) };
            }
        }
        for dir in dirs {
            if w.by_dir.contains_key(dir) {
                continue;
            }
            let Ok(c_dir) = CString::new(dir.as_os_str().as_encoded_bytes()) else {
                continue;
            };
            let mask = libc::IN_CREATE | libc::IN_DELETE | libc::IN_DELETE_SELF | libc::IN_ONLYDIR;
            // SAFETY: NUL-terminated path; our descriptor.
            let wd = unsafe {
                libc::inotify_add_watch(self.fd.get_ref().as_raw_fd(), c_dir.as_ptr(), mask)
            };
            if wd >= 0 {
                w.by_dir.insert(dir.clone(), wd);
                w.by_wd.insert(wd, dir.clone());
                added = true;
            }
        }
        added
    }

    /// Drops the watches at and below `path`, where a cgroup was created or removed: a
    /// directory made again at a watched path is a new one that the old watch does not see
    /// (and the kernel may report the old one's removal late, or never, for a cgroup). The next
    /// [`Watcher::set`] watches what is there now.
    pub fn forget_below(&self, path: &std::path::Path) {
        let mut guard = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        let w = &mut *guard;
        let below: Vec<PathBuf> = w
            .by_dir
            .keys()
            .filter(|d| d.starts_with(path))
            .cloned()
            .collect();
        for dir in below {
            if let Some(wd) = w.by_dir.remove(&dir) {
                w.by_wd.remove(&wd);
                // SAFETY: removing a watch of our own descriptor.
                unsafe { libc::inotify_rm_watch(self.fd.get_ref().as_raw_fd(), wd) };
            }
        }
    }

    /// Waits for events; returns the paths they concern (the child created or removed, or the
    /// watched directory itself when it went away; every watched directory when the kernel's
    /// queue overflowed and events were lost).
    pub async fn next(&self) -> io::Result<Vec<PathBuf>> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut buf = [0u8; 8192];
            // SAFETY: reading into a buffer we own.
            let n = unsafe {
                libc::read(
                    guard.get_inner().as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    guard.clear_ready();
                    continue;
                }
                return Err(e);
            }
            return Ok(self.parse(&buf[..n as usize]));
        }
    }

    fn parse(&self, mut buf: &[u8]) -> Vec<PathBuf> {
        let mut guard = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        let w = &mut *guard;
        let mut out = Vec::new();
        // struct inotify_event { int wd; u32 mask, cookie, len; char name[len]; }
        while buf.len() >= 16 {
            let word = |o: usize| u32::from_ne_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
            let (wd, mask, len) = (word(0) as i32, word(4), word(12) as usize);
            let Some(name) = buf.get(16..16 + len) else {
                break;
            };
            let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
            if mask & libc::IN_Q_OVERFLOW != 0 {
                // Events were lost: every watched directory may have changed.
                out.extend(w.by_dir.keys().cloned());
            } else if let Some(dir) = w.by_wd.get(&wd) {
                if mask & (libc::IN_DELETE_SELF | libc::IN_IGNORED) != 0 {
                    out.push(dir.clone());
                    if mask & libc::IN_IGNORED != 0 {
                        let dir = dir.clone();
                        w.by_wd.remove(&wd);
                        w.by_dir.remove(&dir);
                    }
                } else if !name.is_empty() {
                    out.push(dir.join(std::ffi::OsStr::from_bytes(name)));
                }
            }
            buf = &buf[16 + len..];
        }
        out
    }
}
