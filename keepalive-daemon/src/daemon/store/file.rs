//! A table file in the state directory (`policies.json`, `pods.json`, `config.json`), read
//! whole and replaced whole: written to a temporary file, synced, renamed over the old one.
use std::{
    fs::{self, File},
    io::Write,
    path::{Path, PathBuf},
};

use super::{StoreError, StoredPolicy};
use crate::host::pathio::{io_err, PathIoError};

/// Where a new version of `path` is written before it replaces the old one.
pub(super) fn tmp_path(path: &Path) -> PathBuf {
    path.with_extension("json.tmp")
}

/// The entries of the file at `path`; none if there is no file. Each entry's policy is
/// validated and its path checked under `root` (and rewritten in the form it is kept by); a bad
/// one names the file and its line.
pub(super) fn load(path: &Path, root: &Path) -> Result<Vec<StoredPolicy>, StoreError> {
    let text = match super::open::read(path) {
        Ok(Some(text)) => text,
        Ok(None) => return Ok(Vec::new()),
        Err(e) => return Err(io_err("cannot read", path)(e).into()),
    };
    let mut entries: Vec<StoredPolicy> =
        serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
            path: path.to_path_buf(),
            line: e.line(),
            message: e.to_string(),
        })?;
    let mut seen = std::collections::BTreeSet::new();
    for entry in &mut entries {
        let corrupt = |message: String| StoreError::Corrupt {
            path: path.to_path_buf(),
            line: line_of(&text, &entry.cgroup),
            message: format!("{}: {message}", entry.cgroup),
        };
        entry
            .policy
            .validate()
            .map_err(|e| corrupt(e.to_string()))?;
        let checked = super::kept_path(root, &entry.cgroup).map_err(|e| corrupt(e.to_string()))?;
        if !seen.insert(checked.clone()) {
            return Err(StoreError::Corrupt {
                path: path.to_path_buf(),
                line: line_of_second(&text, &entry.cgroup),
                message: format!(
                    "{} has two entries (which one holds is not known)",
                    checked.display()
                ),
            });
        }
        entry.cgroup = checked.display().to_string();
    }
    Ok(entries)
}

/// Replaces the file at `path` with `text`: a crash leaves either the old file or the new one,
/// and a failed write (a full disk) leaves the old file and no temporary one.
pub(super) fn replace(path: &Path, text: &str) -> Result<(), PathIoError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
    let tmp = tmp_path(path);
    // A link or a FIFO left at the temporary name is neither followed nor waited on.
    let _ = fs::remove_file(&tmp);
    let written = super::open::open(&tmp, fs::OpenOptions::new().write(true).create_new(true))
        .map_err(io_err("cannot create", &tmp))
        .and_then(|mut file| {
            file.write_all(text.as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(io_err("cannot write", &tmp))
        })
        .and_then(|()| fs::rename(&tmp, path).map_err(io_err("cannot replace", path)));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    // The rename is durable once the directory is.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("cannot sync", dir))
}

/// The line of the second mention of `needle` (the first if there is one only).
fn line_of_second(text: &str, needle: &str) -> usize {
    let mut found = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(needle))
        .map(|(i, _)| i + 1);
    let first = found.next().unwrap_or(1);
    found.next().unwrap_or(first)
}

/// The line of the first mention of `needle`, to point the user at a bad entry.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .map_or(1, |i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::super::{Store, StoredPolicy};
    use crate::{host::cgroup, host::process::ExecOwner, model::policy::Policy};
    use std::{fs, path::PathBuf};

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kad-store-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn root() -> PathBuf {
        cgroup::find_root()
            .expect("cgroup2 is mounted (kad needs it)")
            .canonicalize()
            .unwrap()
    }

    #[test]
    fn save_then_load_round_trips() {
        let dir = temp_dir("roundtrip");
        let store = Store::new(&dir);
        let root = root();
        assert!(store.load(&root).unwrap().is_empty());
        // Cgroups that do not exist: their policies wait for them.
        let owner = ExecOwner {
            pid: 4321,
            start_time: 99,
            boot_id: "b".into(),
        };
        let entries = vec![
            StoredPolicy::new(
                root.join("kad-store-a").display().to_string(),
                &Policy::on(Some(180), Some(60), Some(20)).unwrap(),
                None,
            ),
            StoredPolicy::new(
                root.join("kad-store-c").display().to_string(),
                &Policy::on(None, None, Some(3))
                    .unwrap()
                    .with_extras(Some(5000), true)
                    .unwrap(),
                None,
            ),
            StoredPolicy::new(
                root.join("kad-store-a/b").display().to_string(),
                &Policy::OFF,
                Some(owner),
            ),
        ];
        store.save(&entries).unwrap();
        // Loaded in path order.
        let mut sorted = entries.clone();
        sorted.sort_by(|a, b| a.cgroup.cmp(&b.cgroup));
        assert_eq!(store.load(&root).unwrap(), sorted);
        assert!(!dir.join("policies.json.tmp").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn files_without_exec_owners_still_load() {
        let dir = temp_dir("old");
        let store = Store::new(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = root().join("kad-exec-4000000");
        fs::write(
            store.path(),
            format!(
                "[{{\"cgroup\": \"{}\", \"mode\": \"on\", \"idle\": 300, \"intvl\": null, \"cnt\": null}}]",
                path.display()
            ),
        )
        .unwrap();
        let loaded = store.load(&root()).unwrap();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].exec_owner, None, "a name is not an owner");
        assert_eq!(loaded[0].policy.idle, Some(300));
        assert_eq!(
            (loaded[0].policy.user_timeout, loaded[0].policy.enforce),
            (None, false),
            "written before TCP_USER_TIMEOUT and --enforce"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn state_files_of_the_previous_release_load_and_it_reads_ours() {
        let dir = temp_dir("previous");
        let store = Store::new(&dir);
        fs::create_dir_all(&dir).unwrap();
        let a = root().join("kad-previous-a");
        let b = root().join("kad-previous-b");
        // As the previous release wrote it: the policy's fields beside the cgroup, the
        // optional ones left out when unset.
        let previous = format!(
            "[\n  {{\n    \"cgroup\": \"{}\",\n    \"mode\": \"on\",\n    \"idle\": 180,\n    \"intvl\": 60,\n    \"cnt\": 20,\n    \"user_timeout\": 90000,\n    \"enforce\": true,\n    \"exec_owner\": {{\n      \"pid\": 42,\n      \"start_time\": 7,\n      \"boot_id\": \"b\"\n    }}\n  }},\n  {{\n    \"cgroup\": \"{}\",\n    \"mode\": \"off\",\n    \"idle\": null,\n    \"intvl\": null,\n    \"cnt\": null\n  }}\n]\n",
            a.display(),
            b.display()
        );
        fs::write(store.path(), &previous).unwrap();
        let loaded = store.load(&root()).unwrap();
        let on = Policy::on(Some(180), Some(60), Some(20))
            .unwrap()
            .with_extras(Some(90000), true)
            .unwrap();
        assert_eq!(loaded[0].policy, on);
        assert_eq!(loaded[0].exec_owner.as_ref().map(|o| o.pid), Some(42));
        assert_eq!(loaded[1].policy, Policy::OFF);

        // What this release writes, read as the previous release's entry read it.
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        struct PreviousEntry {
            cgroup: String,
            mode: crate::model::policy::Mode,
            idle: Option<u32>,
            intvl: Option<u32>,
            cnt: Option<u32>,
            #[serde(default)]
            user_timeout: Option<u32>,
            #[serde(default)]
            enforce: bool,
            #[serde(default)]
            exec_owner: Option<crate::host::process::ExecOwner>,
            #[serde(default)]
            pod: Option<String>,
        }
        store.save(&loaded).unwrap();
        let ours: Vec<PreviousEntry> =
            serde_json::from_str(&fs::read_to_string(store.path()).unwrap()).unwrap();
        assert_eq!(
            (ours[0].idle, ours[0].user_timeout, ours[0].enforce),
            (Some(180), Some(90000), true)
        );
        assert_eq!(ours[0].exec_owner.as_ref().map(|o| o.pid), Some(42));
        assert_eq!(ours[1].mode, crate::model::policy::Mode::Off);
        assert_eq!(ours[1].cgroup, b.display().to_string());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn corrupt_files_name_the_file_and_line() {
        let dir = temp_dir("corrupt");
        let store = Store::new(&dir);
        let root = root();
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            store.path(),
            "[\n{\"cgroup\": \"/a\",\n\"mode\": \"on\", \"idle\": x}\n]",
        )
        .unwrap();
        let msg = store.load(&root).unwrap_err().to_string();
        assert!(msg.contains("policies.json:3:"), "{msg}");

        fs::write(
            store.path(),
            "[\n  {\"cgroup\": \"/a\", \"mode\": \"on\", \"idle\": 0, \"intvl\": null, \"cnt\": null}\n]",
        )
        .unwrap();
        let msg = store.load(&root).unwrap_err().to_string();
        assert!(
            msg.contains("policies.json:2:") && msg.contains("--idle"),
            "{msg}"
        );

        // A path through a symbolic link (here to the cgroup2 root) names its entry's line.
        let link = dir.join("link");
        std::os::unix::fs::symlink(&root, &link).unwrap();
        let good = root.join("kad-store-c").display().to_string();
        fs::write(
            store.path(),
            format!(
                "[\n  {{\"cgroup\": \"{good}\", \"mode\": \"off\", \"idle\": null, \"intvl\": null, \"cnt\": null}},\n  {{\"cgroup\": \"{}\", \"mode\": \"off\", \"idle\": null, \"intvl\": null, \"cnt\": null}}\n]",
                link.display()
            ),
        )
        .unwrap();
        let msg = store.load(&root).unwrap_err().to_string();
        assert!(
            msg.contains("policies.json:3:")
                && msg.contains("symbolic link")
                && msg.contains("cgroup2 root"),
            "{msg}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn duplicates_unknown_fields_and_links_are_refused_by_name() {
        let dir = temp_dir("strict");
        let store = Store::new(&dir);
        let root = root();
        fs::create_dir_all(&dir).unwrap();
        let a = root.join("kad-store-strict-a").display().to_string();
        let entry = |cgroup: &str, idle: u32, extra: &str| {
            format!("  {{\"cgroup\": \"{cgroup}\", \"mode\": \"on\", \"idle\": {idle}, \"intvl\": null, \"cnt\": null{extra}}}")
        };
        fs::write(
            store.path(),
            format!("[\n{},\n{}\n]\n", entry(&a, 10, ""), entry(&a, 20, "")),
        )
        .unwrap();
        let msg = store.load(&root).unwrap_err().to_string();
        assert!(
            msg.contains("policies.json:3:") && msg.contains("two entries") && msg.contains(&a),
            "{msg}"
        );
        fs::write(
            store.path(),
            format!("[\n{}\n]\n", entry(&a, 10, ", \"colour\": 1")),
        )
        .unwrap();
        let msg = store.load(&root).unwrap_err().to_string();
        assert!(
            msg.contains("policies.json:2:") && msg.contains("unknown field `colour`"),
            "{msg}"
        );
        // In an exec owner too.
        fs::write(
            store.path(),
            format!(
                "[\n{}\n]\n",
                entry(
                    &a,
                    10,
                    ", \"exec_owner\": {\"pid\": 1, \"start_time\": 2, \"boot_id\": \"b\", \"x\": 3}"
                )
            ),
        )
        .unwrap();
        let msg = store.load(&root).unwrap_err().to_string();
        assert!(msg.contains("unknown field `x`"), "{msg}");
        // The journal's entries are read the same way.
        fs::remove_file(store.path()).unwrap();
        fs::write(
            dir.join("policies.journal"),
            format!("{{\"set\": {}}}\n", entry(&a, 10, ", \"colour\": 1").trim()),
        )
        .unwrap();
        let msg = store.load(&root).unwrap_err().to_string();
        assert!(
            msg.contains("policies.journal:1:") && msg.contains("unknown field `colour`"),
            "{msg}"
        );
        // A dangling link as the journal: refused, and nothing made at its target.
        fs::remove_file(dir.join("policies.journal")).unwrap();
        let target = dir.join("elsewhere");
        std::os::unix::fs::symlink(&target, dir.join("policies.journal")).unwrap();
        let msg = store.load(&root).unwrap_err().to_string();
        assert!(msg.contains("symbolic link"), "{msg}");
        let change = super::super::Change::Unset(a.clone());
        let msg = store.record(&change).unwrap_err().to_string();
        assert!(msg.contains("symbolic link"), "{msg}");
        assert!(!target.exists(), "nothing was written through the link");
        // A FIFO as the state file: refused at once, not waited on.
        fs::remove_file(dir.join("policies.journal")).unwrap();
        let c = std::ffi::CString::new(store.path().to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let msg = store.load(&root).unwrap_err().to_string();
        assert!(msg.contains("a FIFO, not a regular file"), "{msg}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_save_leaves_the_old_file_and_no_temporary_one() {
        let dir = temp_dir("failed");
        let store = Store::new(&dir);
        // policies.json is a non-empty directory: the rename fails after the write.
        fs::create_dir_all(store.path().join("x")).unwrap();
        let err = store.save(&[]).unwrap_err().to_string();
        assert!(err.contains("cannot replace"), "{err}");
        assert!(!dir.join("policies.json.tmp").exists(), "tmp removed");
        fs::remove_dir_all(&dir).unwrap();
    }
}
