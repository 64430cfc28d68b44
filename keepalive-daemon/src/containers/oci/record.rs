//! The hook's record of a policy it set, one file per container id in the run directory
//! (`/run/kad/oci-hooks`): the cgroup, so that `poststop` removes exactly that, whatever the
//! container's config says by then.
use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::Path,
};

use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    cgroup: String,
}

/// The cgroup a record's bytes name; `None` for a damaged record.
pub(super) fn parse(bytes: &[u8]) -> Option<String> {
    serde_json::from_slice::<Record>(bytes)
        .ok()
        .map(|r| r.cgroup)
}

/// Writes the record at `path` (the directory private to root), replacing any older one whole.
pub(super) fn write(path: &Path, cgroup: &str) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(&serde_json::to_vec(&Record {
        cgroup: cgroup.to_string(),
    })?)?;
    drop(file);
    fs::rename(&tmp, path)
}
