//! The policy table on disk: `policies.json` in the state directory, replaced atomically.
use std::{
    fs::{self, File},
    io::{self, Write},
    path::{Path, PathBuf},
};

use crate::{
    pathio::{io_err, remove_file_if_present, PathIoError},
    protocol::PolicyEntry,
};

const FILE_NAME: &str = "policies.json";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Io(#[from] PathIoError),
    #[error("{path}:{line}: {message}; fix or remove the file (kad refuses to start rather than drop policies)")]
    Corrupt {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

pub struct Store {
    path: PathBuf,
}

impl Store {
    pub fn new(state_dir: &Path) -> Self {
        Store {
            path: state_dir.join(FILE_NAME),
        }
    }

    /// Whether the state file is there (a missing one with pinned policies is worth a warning).
    pub fn exists(&self) -> bool {
        self.path.exists()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved table; empty when nothing was saved yet.
    pub fn load(&self) -> Result<Vec<PolicyEntry>, StoreError> {
        let text = match fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("cannot read", &self.path)(e).into()),
        };
        let entries: Vec<PolicyEntry> =
            serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
                path: self.path.clone(),
                line: e.line(),
                message: e.to_string(),
            })?;
        for entry in &entries {
            entry.policy().validate().map_err(|e| StoreError::Corrupt {
                path: self.path.clone(),
                line: line_of(&text, &entry.cgroup),
                message: format!("{}: {e}", entry.cgroup),
            })?;
        }
        Ok(entries)
    }

    /// Writes the table to a temporary file, syncs it and renames it over the old one, so that
    /// a crash leaves either the old table or the new one.
    pub fn save(&self, entries: &[PolicyEntry]) -> Result<(), StoreError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
        let tmp = self.path.with_extension("json.tmp");
        let mut text = serde_json::to_string_pretty(entries).unwrap_or_else(|_| "[]".into());
        text.push('\n');
        let mut file = File::create(&tmp).map_err(io_err("cannot create", &tmp))?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io_err("cannot write", &tmp))?;
        fs::rename(&tmp, &self.path).map_err(io_err("cannot replace", &self.path))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("cannot sync", dir))?;
        Ok(())
    }
}

/// Removes the saved policies and, if nothing else is in it, the state directory.
pub fn purge(state_dir: &Path) -> Result<(), StoreError> {
    let store = Store::new(state_dir);
    for path in [store.path.clone(), store.path.with_extension("json.tmp")] {
        remove_file_if_present(&path)?;
    }
    let _ = fs::remove_dir(state_dir);
    Ok(())
}

/// The line of the first mention of `needle`, to point the user at a bad entry.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .map_or(1, |i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kad-store-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn save_then_load_round_trips() {
        let dir = temp_dir("roundtrip");
        let store = Store::new(&dir);
        assert!(store.load().unwrap().is_empty());
        let entries = vec![
            PolicyEntry::new(
                "/sys/fs/cgroup/a".into(),
                &Policy::on(Some(180), Some(60), Some(20)).unwrap(),
            ),
            PolicyEntry::new("/sys/fs/cgroup/a/b".into(), &Policy::OFF),
        ];
        store.save(&entries).unwrap();
        assert_eq!(store.load().unwrap(), entries);
        assert!(!dir.join("policies.json.tmp").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn corrupt_files_name_the_file_and_line() {
        let dir = temp_dir("corrupt");
        let store = Store::new(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            store.path(),
            "[\n{\"cgroup\": \"/a\",\n\"mode\": \"on\", \"idle\": x}\n]",
        )
        .unwrap();
        let msg = store.load().unwrap_err().to_string();
        assert!(msg.contains("policies.json:3:"), "{msg}");

        fs::write(
            store.path(),
            "[\n  {\"cgroup\": \"/a\", \"mode\": \"on\", \"idle\": 0, \"intvl\": null, \"cnt\": null}\n]",
        )
        .unwrap();
        let msg = store.load().unwrap_err().to_string();
        assert!(
            msg.contains("policies.json:2:") && msg.contains("--idle"),
            "{msg}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
