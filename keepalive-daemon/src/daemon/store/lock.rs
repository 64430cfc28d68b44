//! The state directory's lock: an exclusive `flock` on the directory, held while the daemon
//! runs, because two daemons writing one `policies.json` would overwrite each other's table.
use std::{
    fs::{self, File},
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use super::StoreError;
use crate::host::pathio::io_err;

/// An exclusive lock on a state directory, held while the daemon runs.
pub struct StateLock {
    _dir: File,
    /// The directory, if this lock created it: removed again on drop while nothing was saved,
    /// so that a daemon that fails to start leaves nothing behind.
    created: Option<PathBuf>,
}

impl StateLock {
    pub fn acquire(state_dir: &Path) -> Result<StateLock, StoreError> {
        let created = match fs::create_dir(state_dir) {
            Ok(()) => Some(state_dir.to_path_buf()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => None,
            Err(_) => {
                fs::create_dir_all(state_dir).map_err(io_err("cannot create", state_dir))?;
                Some(state_dir.to_path_buf())
            }
        };
        let result = File::open(state_dir)
            .map_err(|e| io_err("cannot open", state_dir)(e).into())
            .and_then(|dir| lock(dir, state_dir));
        match result {
            Ok(dir) => Ok(StateLock { _dir: dir, created }),
            Err(e) => {
                if let Some(dir) = created {
                    let _ = fs::remove_dir(dir);
                }
                Err(e)
            }
        }
    }
}

/// Takes the exclusive lock on the open state directory `dir`.
fn lock(dir: File, state_dir: &Path) -> Result<File, StoreError> {
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(dir);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Err(StoreError::Busy(state_dir.to_path_buf()));
    }
    Err(io_err("cannot lock", state_dir)(err).into())
}

/// The lock on a state directory made again while the daemon runs (the [`StateLock`] holds
/// the one that was removed).
#[derive(Debug, Default)]
pub struct Relock(Option<File>);

impl Relock {
    pub fn relock(&mut self, state_dir: &Path) -> Result<(), StoreError> {
        let dir = File::open(state_dir).map_err(io_err("cannot open", state_dir))?;
        self.0 = Some(lock(dir, state_dir)?);
        Ok(())
    }
}

impl Drop for StateLock {
    fn drop(&mut self) {
        if let Some(dir) = &self.created {
            // Fails, as it should, once the directory holds anything.
            let _ = fs::remove_dir(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::Store;
    use super::*;

    #[test]
    fn one_daemon_per_state_directory() {
        let dir = std::env::temp_dir().join(format!("kad-store-lock-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let first = StateLock::acquire(&dir).unwrap();
        assert!(dir.is_dir());
        let err = StateLock::acquire(&dir).err().expect("second lock refused");
        assert!(matches!(&err, StoreError::Busy(d) if d == &dir), "{err}");
        assert!(err.to_string().contains("--state-dir"), "{err}");
        assert!(dir.is_dir(), "the refused one removed nothing");
        drop(first);
        // It made the directory and nothing was saved: it leaves nothing behind.
        assert!(!dir.exists());
        let again = StateLock::acquire(&dir).unwrap();
        Store::new(&dir).save(&[]).unwrap();
        drop(again);
        assert!(dir.join("policies.json").exists(), "a used directory stays");
        fs::remove_dir_all(&dir).unwrap();
    }
}
