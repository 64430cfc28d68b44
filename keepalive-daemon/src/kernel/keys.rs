//! The key of a policy path in the paths map: the path relative to the cgroup2 root, as the
//! kernel names cgroups in its `cgroup_mkdir` tracepoint ("/a/b").
use std::path::{Path, PathBuf};

use keepalive_common::{PathKey, PATH_KEY_LEN};

/// The key of a path in the paths map: relative to the cgroup2 root, as the kernel names
/// cgroups in its `cgroup_mkdir` tracepoint ("/a/b").
pub fn path_key(root: &Path, path: &Path) -> Option<PathKey> {
    let relative = path.strip_prefix(root).ok()?;
    let text = format!("/{}", relative.display());
    let bytes = text.as_bytes();
    if bytes.len() >= PATH_KEY_LEN || bytes.contains(&0) {
        return None;
    }
    let mut key = PathKey {
        bytes: [0; PATH_KEY_LEN],
    };
    key.bytes[..bytes.len()].copy_from_slice(bytes);
    Some(key)
}

/// The absolute path a path key stands for.
pub fn key_path(root: &Path, key: &PathKey) -> Option<PathBuf> {
    let len = key.bytes.iter().position(|&b| b == 0)?;
    let text = std::str::from_utf8(&key.bytes[..len]).ok()?;
    match text.strip_prefix('/')? {
        // The host policy's key: the root itself, spelled without a trailing slash.
        "" => Some(root.to_path_buf()),
        relative => Some(root.join(relative)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_keys_are_relative_to_the_root_and_round_trip() {
        let root = Path::new("/sys/fs/cgroup/unified");
        let key = path_key(root, Path::new("/sys/fs/cgroup/unified/a/b")).expect("a key");
        assert_eq!(&key.bytes[..5], b"/a/b\0");
        assert_eq!(
            key_path(root, &key),
            Some(PathBuf::from("/sys/fs/cgroup/unified/a/b"))
        );
        assert!(path_key(root, Path::new("/elsewhere/a")).is_none());
        let host = path_key(root, root).expect("the host policy's key");
        assert_eq!(&host.bytes[..2], b"/\0");
        assert_eq!(key_path(root, &host).as_deref(), Some(root));
        let long = root.join("x".repeat(PATH_KEY_LEN));
        assert!(path_key(root, &long).is_none());
    }
}
