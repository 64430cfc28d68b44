//! The I/O error every module reports: what was being done, to which path, and why.
use std::{
    io,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {source}")]
pub struct PathIoError {
    pub what: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// For `map_err`: `fs::rename(a, b).map_err(io_err("cannot replace", b))`.
pub fn io_err(what: &'static str, path: impl AsRef<Path>) -> impl FnOnce(io::Error) -> PathIoError {
    let path = path.as_ref().to_path_buf();
    move |source| PathIoError { what, path, source }
}

/// Removes a file; one that is already gone is fine.
pub fn remove_file_if_present(path: &Path) -> Result<(), PathIoError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("cannot remove", path)(e)),
        _ => Ok(()),
    }
}
