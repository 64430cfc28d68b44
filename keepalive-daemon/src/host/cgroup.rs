//! Finding the cgroup2 hierarchy and turning a user's path into a cgroup kad can attach to.
use std::{
    ffi::CString,
    io,
    os::unix::{ffi::OsStrExt, fs::MetadataExt},
    path::{Component, Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup2 filesystem is mounted (looked in /proc/self/mountinfo)")]
    NoCgroup2,
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("empty cgroup path")]
    Empty,
    #[error("cgroup path '{0}' contains '..': give the path without it")]
    DotDot(String),
    #[error("no such cgroup: {0} does not exist")]
    NotFound(PathBuf),
    #[error("{0} is a file, not a cgroup directory")]
    NotADirectory(PathBuf),
    #[error("{path} is not on the cgroup2 filesystem (mounted at {root})")]
    NotCgroup2 { path: PathBuf, root: PathBuf },
    #[error("refusing the cgroup2 root {0} as a cgroup: for a policy on every TCP connection of the host, use --host (`host = true` in the config file); otherwise name a child cgroup such as system.slice")]
    Root(PathBuf),
    #[error(
        "{path} goes through a symbolic link (to {target}{root_note}): give the cgroup's own path"
    )]
    Symlink {
        path: PathBuf,
        target: PathBuf,
        /// ", the cgroup2 root" when the link leads there.
        root_note: &'static str,
    },
}

/// A cgroup directory kad can attach to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    /// Absolute, canonical path under the cgroup2 root.
    pub path: PathBuf,
    /// The id BPF sees for this cgroup: its directory's inode number.
    pub id: u64,
}

/// Where the cgroup2 filesystem is mounted, from `/proc/self/mountinfo`.
pub fn find_root() -> Result<PathBuf, CgroupError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(path).map_err(|source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    root_from_mountinfo(&text).ok_or(CgroupError::NoCgroup2)
}

/// The first cgroup2 mount point in mountinfo text (see proc(5) for the format).
pub fn root_from_mountinfo(text: &str) -> Option<PathBuf> {
    text.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        if fs.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mount_point = mount.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_octal(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Turns what the user typed into a cgroup: an absolute path on the cgroup2 filesystem or a
/// path relative to its root. Rejects anything else with an error that names the problem.
pub fn resolve(root: &Path, input: &str) -> Result<Cgroup, CgroupError> {
    let path = lexical_path(root, input)?;
    let meta = match std::fs::metadata(&path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(CgroupError::NotFound(path)),
        Err(source) => return Err(CgroupError::Io { path, source }),
    };
    if !meta.is_dir() {
        return Err(CgroupError::NotADirectory(path));
    }
    if !on_root_fs(&path, root).map_err(|source| CgroupError::Io {
        path: path.clone(),
        source,
    })? {
        return Err(CgroupError::NotCgroup2 {
            path,
            root: root.to_path_buf(),
        });
    }
    let canonical = path.canonicalize().map_err(|source| CgroupError::Io {
        path: path.clone(),
        source,
    })?;
    let root = root.canonicalize().map_err(|source| CgroupError::Io {
        path: root.to_path_buf(),
        source,
    })?;
    if canonical == root {
        return Err(CgroupError::Root(root));
    }
    if !canonical.starts_with(&root) {
        // Another mount of cgroup2 elsewhere: policies are kept by path under one root.
        return Err(CgroupError::NotCgroup2 {
            path: canonical,
            root,
        });
    }
    Ok(Cgroup {
        path: canonical,
        id: meta.ino(),
    })
}

/// The path a policy may name: an existing cgroup (as `resolve`), or a path that does not
/// exist yet below an existing cgroup2 directory, so that a policy can be in place before a
/// service or container creates its cgroup. The existing part is resolved (symlinks and all)
/// and checked; the rest must be plain names.
pub fn policy_path(root: &Path, input: &str) -> Result<PathBuf, CgroupError> {
    match resolve(root, input) {
        Ok(cgroup) => return Ok(cgroup.path),
        Err(CgroupError::NotFound(_)) => {}
        // Below a file: the walk up finds the file and says so.
        Err(CgroupError::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOTDIR) => {}
        Err(e) => return Err(e),
    }
    let path = lexical_path(root, input)?;
    let mut missing = Vec::new();
    let mut existing = path.as_path();
    while !existing.exists() {
        let (Some(parent), Some(name)) = (existing.parent(), existing.file_name()) else {
            return Err(CgroupError::NotFound(path.clone()));
        };
        missing.push(name.to_os_string());
        existing = parent;
    }
    if missing
        .iter()
        .any(|n| n == "." || n.as_encoded_bytes().contains(&b'\n'))
    {
        return Err(CgroupError::NotFound(path.clone()));
    }
    // The existing part must itself be a cgroup (or the root): checked and canonicalised.
    let base = match resolve(root, &existing.display().to_string()) {
        Ok(cgroup) => cgroup.path,
        Err(CgroupError::Root(root)) => root,
        Err(e) => return Err(e),
    };
    Ok(missing.iter().rev().fold(base, |p, n| p.join(n)))
}

/// The nearest existing directory at or above `path` (which is under `root`).
pub fn nearest_existing(path: &Path) -> &Path {
    path.ancestors()
        .find(|p| p.is_dir())
        .unwrap_or_else(|| Path::new("/"))
}

/// The id of an open cgroup directory.
pub fn id_of_file(dir: &std::fs::File) -> io::Result<u64> {
    Ok(dir.metadata()?.ino())
}

/// The cgroup directories at and below `path` (a cgroup that exists), parents first.
pub fn subtree(path: &Path) -> Vec<PathBuf> {
    let mut out = vec![path.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        if let Ok(entries) = std::fs::read_dir(&out[i]) {
            for entry in entries.flatten() {
                if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    out.push(entry.path());
                }
            }
        }
        i += 1;
    }
    out
}

/// The processes in one cgroup (not its descendants).
pub fn procs(path: &Path) -> Vec<u32> {
    std::fs::read_to_string(path.join("cgroup.procs"))
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// The path `input` names, checked like `resolve` as far as it exists: a policy from a file may
/// wait for a cgroup that is not there yet, but a path through a symbolic link, off cgroup2, or
/// the cgroup2 root itself is refused. Policies are kept by path, so a link is not followed: the
/// policy would name one cgroup and act on whatever the link points to later.
pub fn checked_path(root: &Path, input: &str) -> Result<PathBuf, CgroupError> {
    let path = lexical_path(root, input)?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CgroupError::Io { path, source }
    };
    let canonical_root = root.canonicalize().map_err(io(root))?;
    // The deepest part of the path that exists ("/" always does).
    let mut existing = path.as_path();
    loop {
        match std::fs::symlink_metadata(existing) {
            Ok(_) => break,
            // ENOTDIR: a file on the way; its parent is checked and refused below.
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(libc::ENOTDIR) =>
            {
                match existing.parent() {
                    Some(parent) => existing = parent,
                    None => return Err(CgroupError::NotFound(path)),
                }
            }
            Err(source) => return Err(io(existing)(source)),
        }
    }
    let canonical = existing.canonicalize().map_err(io(existing))?;
    // The root as mountinfo names it may itself differ from its canonical form.
    let expected = match existing.strip_prefix(root) {
        Ok(rest) => canonical_root.join(rest),
        Err(_) => existing.to_path_buf(),
    };
    if canonical != expected {
        let root_note = if canonical == canonical_root {
            ", the cgroup2 root"
        } else {
            ""
        };
        return Err(CgroupError::Symlink {
            path,
            target: canonical,
            root_note,
        });
    }
    let full = match path.strip_prefix(root) {
        Ok(rest) => canonical_root.join(rest),
        Err(_) => path.clone(),
    };
    if !canonical.starts_with(&canonical_root)
        || !on_root_fs(&canonical, &canonical_root).map_err(io(&canonical))?
    {
        return Err(CgroupError::NotCgroup2 {
            path: full,
            root: canonical_root,
        });
    }
    if !std::fs::metadata(&canonical)
        .map_err(io(&canonical))?
        .is_dir()
    {
        return Err(CgroupError::NotADirectory(canonical));
    }
    if full == canonical_root {
        return Err(CgroupError::Root(canonical_root));
    }
    Ok(full)
}

/// The absolute path `input` names, without touching the filesystem.
pub fn lexical_path(root: &Path, input: &str) -> Result<PathBuf, CgroupError> {
    if input.trim().is_empty() {
        return Err(CgroupError::Empty);
    }
    let given = Path::new(input);
    if given.components().any(|c| c == Component::ParentDir) {
        return Err(CgroupError::DotDot(input.to_string()));
    }
    Ok(if given.is_absolute() {
        given.to_path_buf()
    } else {
        root.join(given)
    })
}

/// The cgroup's id as BPF sees it, if the directory still exists.
pub fn id_of(path: &Path) -> io::Result<u64> {
    Ok(std::fs::metadata(path)?.ino())
}

/// The cgroup delegated to `uid` that `path` is at or below: the nearest existing directory on
/// the way up from `path`, when it is below the root and it and its `cgroup.procs` are owned by
/// `uid`, as systemd's `Delegate=` (or a `chown` by root) leaves them, and as the kernel makes
/// the cgroups a user creates in one.
pub fn delegated_to(root: &Path, path: &Path, uid: u32) -> Option<PathBuf> {
    let existing = nearest_existing(path);
    if existing == root || !existing.starts_with(root) {
        return None;
    }
    let owned = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.uid() == uid);
    (owned(existing) && owned(&existing.join("cgroup.procs"))).then(|| existing.to_path_buf())
}

/// Whether `path` is on the filesystem mounted at `root`. The root is the cgroup2 mount
/// ([`find_root`]), so this is the cgroup2 check; comparing devices rather than magic numbers
/// also lets the daemon's unit tests stand a temporary directory in for the root.
fn on_root_fs(path: &Path, root: &Path) -> io::Result<bool> {
    Ok(std::fs::metadata(path)?.dev() == std::fs::metadata(root)?.dev())
}

fn fs_magic(path: &Path) -> io::Result<i64> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    // SAFETY: statfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_path.as_ptr(), &mut buf) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(buf.f_type as i64)
}

/// Whether `path` (which must exist) is on a filesystem with the given magic number.
pub fn is_fs(path: &Path, magic: i64) -> io::Result<bool> {
    Ok(fs_magic(path)? == magic)
}

/// Whether processes remain in the cgroup at `path` (or below it); false once it is gone.
pub fn populated(path: &Path) -> bool {
    std::fs::read_to_string(path.join("cgroup.events"))
        .map(|t| t.lines().any(|l| l == "populated 1"))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 1 0:23 / /sys rw,nosuid - sysfs sysfs rw
30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
";

    #[test]
    fn mountinfo_finds_the_cgroup2_mount() {
        assert_eq!(
            root_from_mountinfo(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let pure = "29 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            root_from_mountinfo(pure),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            root_from_mountinfo("25 1 0:23 / /sys rw - sysfs sysfs rw\n"),
            None
        );
    }

    #[test]
    fn mountinfo_unescapes_spaces() {
        let line = "31 30 0:27 / /mnt/my\\040cg rw - cgroup2 cgroup2 rw\n";
        assert_eq!(root_from_mountinfo(line), Some(PathBuf::from("/mnt/my cg")));
    }

    #[test]
    fn lexical_path_joins_relative_paths_to_the_root() {
        let root = Path::new("/sys/fs/cgroup");
        assert_eq!(
            lexical_path(root, "system.slice/nginx.service").unwrap(),
            PathBuf::from("/sys/fs/cgroup/system.slice/nginx.service")
        );
        assert_eq!(
            lexical_path(root, "/sys/fs/cgroup/app").unwrap(),
            PathBuf::from("/sys/fs/cgroup/app")
        );
    }

    #[test]
    fn lexical_path_rejects_empty_and_dotdot() {
        let root = Path::new("/sys/fs/cgroup");
        assert!(matches!(lexical_path(root, ""), Err(CgroupError::Empty)));
        assert!(matches!(lexical_path(root, "  "), Err(CgroupError::Empty)));
        assert!(matches!(
            lexical_path(root, "app/../../etc"),
            Err(CgroupError::DotDot(_))
        ));
        assert!(matches!(
            lexical_path(root, "/sys/fs/cgroup/.."),
            Err(CgroupError::DotDot(_))
        ));
    }

    #[test]
    fn resolve_rejects_paths_off_cgroup2() {
        let root = find_root().expect("cgroup2 is mounted (kad needs it)");
        let root = root.as_path();
        assert!(matches!(
            resolve(root, "/tmp"),
            Err(CgroupError::NotCgroup2 { .. })
        ));
        assert!(matches!(
            resolve(root, "/nonexistent-kad-dir"),
            Err(CgroupError::NotFound(_))
        ));
        assert!(matches!(
            resolve(root, "/etc/hostname"),
            Err(CgroupError::NotADirectory(_))
        ));
    }

    #[test]
    fn checked_paths_refuse_links_the_root_and_files_but_may_wait() {
        let root = find_root().expect("cgroup2 is mounted (kad needs it)");
        let dir = std::env::temp_dir().join(format!("kad-checked-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let to_root = dir.join("to-root");
        std::os::unix::fs::symlink(&root, &to_root).unwrap();
        let to_tmp = dir.join("to-tmp");
        std::os::unix::fs::symlink(std::env::temp_dir(), &to_tmp).unwrap();

        let err = checked_path(&root, to_root.to_str().unwrap()).unwrap_err();
        assert!(matches!(err, CgroupError::Symlink { .. }), "{err}");
        assert!(err.to_string().contains("the cgroup2 root"), "{err}");
        let below = to_root.join("some-child");
        let err = checked_path(&root, below.to_str().unwrap()).unwrap_err();
        assert!(matches!(err, CgroupError::Symlink { .. }), "{err}");
        let err = checked_path(&root, to_tmp.to_str().unwrap()).unwrap_err();
        assert!(matches!(err, CgroupError::Symlink { .. }), "{err}");
        assert!(matches!(
            checked_path(&root, dir.to_str().unwrap()),
            Err(CgroupError::NotCgroup2 { .. })
        ));
        assert!(matches!(
            checked_path(&root, root.to_str().unwrap()),
            Err(CgroupError::Root(_))
        ));
        assert!(matches!(
            checked_path(&root, "cgroup.procs/x"),
            Err(CgroupError::NotADirectory(_))
        ));
        assert!(matches!(
            checked_path(&root, "a/../.."),
            Err(CgroupError::DotDot(_))
        ));
        // A cgroup that does not exist yet is fine: its policy waits for it.
        let waiting = checked_path(&root, "kad-no-such-cgroup/below").unwrap();
        assert_eq!(
            waiting,
            root.canonicalize()
                .unwrap()
                .join("kad-no-such-cgroup/below")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
