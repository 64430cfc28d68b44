//! The declarative config file (`--config`, default /etc/kad/kad.toml): policies by path.
//!
//! ```toml
//! [[policy]]
//! cgroup = "app"                 # or: unit = "nginx.service" (slice = "system.slice")
//! idle = 180
//! intvl = 60
//! cnt = 20
//! user_timeout = 90000           # TCP_USER_TIMEOUT, milliseconds
//! enforce = true                 # programs' own keepalive setsockopt is rewritten
//!
//! [[policy]]
//! cgroup = "app/batch"
//! off = true
//! ```
use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::Deserialize;

use crate::{host::cgroup, host::target, model::policy::Policy};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    policy: Vec<toml::Spanned<Entry>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    /// The host policy: every connection of the host that no nearer policy decides for.
    #[serde(default)]
    host: bool,
    cgroup: Option<String>,
    unit: Option<String>,
    slice: Option<String>,
    #[serde(default)]
    off: bool,
    idle: Option<u32>,
    intvl: Option<u32>,
    cnt: Option<u32>,
    user_timeout: Option<u32>,
    #[serde(default)]
    enforce: bool,
    /// Users may not set policies below this one.
    #[serde(default)]
    locked: bool,
}

/// The policies of the config file at `path`, keyed by absolute cgroup path; `None` when there
/// is no file (the caller decides what that means for policies it set before). The cgroups
/// need not exist yet: a policy applies when its cgroup appears.
///
/// `had_policies`: the config in force has policies, so an empty file is believed only once it
/// has stayed empty for `EMPTY_SETTLE` (a file truncated by a slow writer is not a config
/// that removes them all).
pub fn load(
    path: &Path,
    root: &Path,
    had_policies: bool,
) -> Result<Option<BTreeMap<PathBuf, Policy>>, ConfigError> {
    let text = match read_stable(path, had_policies) {
        Ok(Some(text)) => text,
        Ok(None) => return Ok(None),
        Err(source) => {
            return Err(ConfigError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    // Paths are checked on the filesystem like the CLI's: no symbolic links, on cgroup2, not
    // the root (the cgroup itself may appear later).
    let check = |input: Option<&str>| match input {
        Some(input) => cgroup::checked_path(root, input),
        None => Ok(root.to_path_buf()),
    };
    parse(&text, check)
        .map(Some)
        .map_err(|(offset, message)| ConfigError::Invalid {
            path: path.to_path_buf(),
            line: line_at(&text, offset),
            message,
        })
}

/// How long the file must stay the same between two reads for them to be believed.
const SETTLE: Duration = Duration::from_millis(50);
/// How long a file that keeps changing is waited for.
const SETTLE_MAX: Duration = Duration::from_secs(3);
/// How long an empty file must stay empty to replace a config that has policies.
const EMPTY_SETTLE: Duration = Duration::from_secs(1);

/// The file's text once it has stopped changing: two reads `SETTLE` apart that agree, with the
/// same size, modification time and inode. A file written in place (truncated, then written
/// piece by piece) is thus not read half written, empty or cut short; one that keeps changing
/// for `SETTLE_MAX` is an error (write it elsewhere and rename it over the old one).
fn read_stable(path: &Path, patient_if_empty: bool) -> io::Result<Option<String>> {
    use std::os::unix::fs::MetadataExt;
    /// Size, modification time (s, ns) and inode: what changes when the file is written.
    type Stamp = (u64, i64, i64, u64);
    let read = || -> io::Result<Option<(String, Stamp)>> {
        let stamp = |m: &std::fs::Metadata| (m.len(), m.mtime(), m.mtime_nsec(), m.ino());
        let before = match std::fs::metadata(path) {
            Ok(m) => stamp(&m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let after = stamp(&std::fs::metadata(path)?);
        // Changed while it was read: no stamp matches it.
        let stamp = if before == after {
            after
        } else {
            (u64::MAX, 0, 0, 0)
        };
        Ok(Some((text, stamp)))
    };
    let start = Instant::now();
    let mut last = read()?;
    loop {
        let empty = last
            .as_ref()
            .is_some_and(|(text, _)| text.trim().is_empty());
        std::thread::sleep(if patient_if_empty && empty {
            EMPTY_SETTLE
        } else {
            SETTLE
        });
        let now = read()?;
        match (&last, &now) {
            (None, None) => return Ok(None),
            (Some((a, sa)), Some((b, sb))) if a == b && sa == sb && sa.0 != u64::MAX => {
                return Ok(now.map(|(text, _)| text))
            }
            _ => {}
        }
        if start.elapsed() > SETTLE_MAX + EMPTY_SETTLE {
            return Err(io::Error::other(format!(
                "it kept changing for {} s: write the new config to another file and rename it \
                 over this one",
                SETTLE_MAX.as_secs()
            )));
        }
        last = now;
    }
}

/// Parses config text, turning each path into the key it is kept by with `check` (`None`: the
/// host policy, kept by the cgroup2 root); an error carries the byte offset it is about.
fn parse(
    text: &str,
    check: impl Fn(Option<&str>) -> Result<PathBuf, cgroup::CgroupError>,
) -> Result<BTreeMap<PathBuf, Policy>, (usize, String)> {
    let file: File = toml::from_str(text).map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start);
        (offset, e.message().to_string())
    })?;
    let mut policies = BTreeMap::new();
    for spanned in file.policy {
        let offset = spanned.span().start;
        let entry = spanned.into_inner();
        let fail = |message: String| (offset, message);
        let relative = match (entry.host, &entry.cgroup, &entry.unit) {
            (true, None, None) if entry.slice.is_none() => None,
            (false, Some(cg), None) if entry.slice.is_none() => Some(cg.clone()),
            (false, None, Some(unit)) => Some(
                target::unit_path(unit, entry.slice.as_deref()).map_err(|e| fail(e.to_string()))?,
            ),
            _ => {
                return Err(fail(
                    "a policy needs one of host = true, cgroup, or unit (with an optional slice)"
                        .into(),
                ))
            }
        };
        let path = check(relative.as_deref()).map_err(|e| fail(e.to_string()))?;
        let policy = if entry.off {
            if entry.enforce {
                return Err(fail(
                    "off = true cannot be combined with enforce = true: an opt-out has no values to enforce"
                        .into(),
                ));
            }
            if entry.idle.is_some()
                || entry.intvl.is_some()
                || entry.cnt.is_some()
                || entry.user_timeout.is_some()
            {
                return Err(fail(
                    "off = true cannot be combined with idle, intvl, cnt or user_timeout".into(),
                ));
            }
            Policy::OFF
        } else {
            Policy::on(entry.idle, entry.intvl, entry.cnt)
                .and_then(|p| p.with_extras(entry.user_timeout, entry.enforce))
                .map_err(|e| fail(e.to_string()))?
        };
        let policy = Policy {
            locked: entry.locked,
            ..policy
        };
        if policies.insert(path.clone(), policy).is_some() {
            return Err(fail(format!("{} has two policies", path.display())));
        }
    }
    Ok(policies)
}

fn line_at(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map_or(1, |before| before.matches('\n').count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: &str = "/sys/fs/cgroup";

    /// The lexical part of the checks, for text without a filesystem behind it.
    fn parse(text: &str, root: &Path) -> Result<BTreeMap<PathBuf, Policy>, (usize, String)> {
        super::parse(text, |input| {
            let Some(input) = input else {
                return Ok(root.to_path_buf());
            };
            let path = cgroup::lexical_path(root, input)?;
            if path == root {
                return Err(cgroup::CgroupError::Root(root.to_path_buf()));
            }
            Ok(path)
        })
    }

    #[test]
    fn host_true_is_the_host_policy_and_takes_no_path() {
        let policies = parse("[[policy]]\nhost = true\nidle = 300\n", Path::new(ROOT)).unwrap();
        assert_eq!(
            policies.get(Path::new(ROOT)).and_then(|p| p.idle),
            Some(300)
        );
        for text in [
            "[[policy]]\nhost = true\ncgroup = \"app\"\nidle = 1\n",
            "[[policy]]\nhost = true\nunit = \"x\"\nidle = 1\n",
            "[[policy]]\nidle = 1\n",
        ] {
            let (_, message) = parse(text, Path::new(ROOT)).unwrap_err();
            assert!(message.contains("host = true"), "{text}: {message}");
        }
        let (_, message) = parse(
            &format!("[[policy]]\ncgroup = \"{ROOT}\"\nidle = 1\n"),
            Path::new(ROOT),
        )
        .unwrap_err();
        assert!(
            message.contains("--host"),
            "the root by path points at the host policy: {message}"
        );
    }

    #[test]
    fn parses_cgroups_units_and_off() {
        let text = r#"
[[policy]]
cgroup = "app"
idle = 180
intvl = 60
cnt = 20

[[policy]]
cgroup = "/sys/fs/cgroup/app/batch"
off = true

[[policy]]
unit = "nginx"
idle = 300
"#;
        let policies = parse(text, Path::new(ROOT)).unwrap();
        assert_eq!(policies.len(), 3);
        assert_eq!(
            policies[Path::new("/sys/fs/cgroup/app")],
            Policy::on(Some(180), Some(60), Some(20)).unwrap()
        );
        assert_eq!(policies[Path::new("/sys/fs/cgroup/app/batch")], Policy::OFF);
        assert_eq!(
            policies[Path::new("/sys/fs/cgroup/system.slice/nginx.service")],
            Policy::on(Some(300), None, None).unwrap()
        );
        assert!(parse("", Path::new(ROOT)).unwrap().is_empty());
    }

    #[test]
    fn user_timeout_and_enforce_keys() {
        let text =
            "[[policy]]\ncgroup = \"app\"\nidle = 100\nuser_timeout = 90000\nenforce = true\n";
        let policies = parse(text, Path::new(ROOT)).unwrap();
        assert_eq!(
            policies[Path::new("/sys/fs/cgroup/app")],
            Policy::on(Some(100), None, None)
                .unwrap()
                .with_extras(Some(90000), true)
                .unwrap()
        );
    }

    #[test]
    fn errors_point_at_the_line() {
        let cases = [
            (
                "[[policy]]\ncgroup = \"a\"\nidle = 0\n",
                1,
                "between 1 and 32767",
            ),
            (
                "[[policy]]\ncgroup = \"a\"\n\n[[policy]]\ncgroup = \"b\"\ncnt = 500\n",
                4,
                "between 1 and 127",
            ),
            (
                "[[policy]]\ncgroup = \"a\"\nidle = \"x\"\n",
                3,
                "expected u32",
            ),
            ("[[policy]]\ncgroup = \"a\"\ncolour = 1\n", 3, "colour"),
            ("[[policy]]\ncgroup = \"a/../..\"\n", 1, ".."),
            (
                "[[policy]]\nidle = 5\n",
                1,
                "one of host = true, cgroup, or unit",
            ),
            (
                "[[policy]]\ncgroup = \"a\"\noff = true\nidle = 5\n",
                1,
                "off",
            ),
            (
                "[[policy]]\ncgroup = \"/sys/fs/cgroup\"\n",
                1,
                "cgroup2 root",
            ),
            ("[[policy]\n", 1, ""),
            (
                "[[policy]]\ncgroup = \"a\"\nuser_timeout = 0\n",
                1,
                "--user-timeout must be a whole number between 1 and 2147483647",
            ),
            ("[[policy]]\ncgroup = \"a\"\nuser_timeout = -5\n", 3, "u32"),
            (
                "[[policy]]\ncgroup = \"a\"\noff = true\nenforce = true\n",
                1,
                "enforce",
            ),
            (
                "[[policy]]\ncgroup = \"a\"\noff = true\nuser_timeout = 5\n",
                1,
                "user_timeout",
            ),
        ];
        for (text, line, expected) in cases {
            let (offset, message) = parse(text, Path::new(ROOT)).unwrap_err();
            assert_eq!(line_at(text, offset), line, "{text:?}: {message}");
            assert!(message.contains(expected), "{text:?}: {message}");
        }
    }

    #[test]
    fn a_file_written_in_place_is_never_read_half_written() {
        let dir = std::env::temp_dir().join(format!("kad-config-torn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("kad.toml");
        let text: String = (0..8)
            .map(|i| format!("[[policy]]\ncgroup = \"a{i}\"\nidle = {}\n", 100 + i))
            .collect();
        std::fs::write(&file, &text).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (file, text, stop) = (file.clone(), text.clone(), stop.clone());
            std::thread::spawn(move || {
                use std::io::Write;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // Truncated, then written in small pieces, as an editor saving in place.
                    let mut f = std::fs::File::create(&file).unwrap();
                    for chunk in text.as_bytes().chunks(16) {
                        f.write_all(chunk).unwrap();
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    drop(f);
                    std::thread::sleep(Duration::from_millis(120));
                }
            })
        };
        let mut whole = 0;
        for _ in 0..20 {
            // Lexical checks: the root is not a cgroup2 mount here.
            match read_stable(&file, true) {
                Ok(Some(read)) => {
                    assert_eq!(read, text, "only the whole file is read");
                    whole += 1;
                }
                Ok(None) => panic!("the file is there"),
                Err(e) => assert!(e.to_string().contains("rename"), "{e}"),
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(whole > 0, "the file was read whole between writes");
    }

    #[test]
    fn a_file_truncated_by_a_slow_writer_is_not_read_empty() {
        let dir = std::env::temp_dir().join(format!("kad-config-slow-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("kad.toml");
        let text = "[[policy]]\ncgroup = \"a\"\nidle = 100\n";
        std::fs::write(&file, text).unwrap();
        // `: > kad.toml; generate > kad.toml`: empty for longer than SETTLE.
        std::fs::write(&file, "").unwrap();
        let writer = {
            let file = file.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                std::fs::write(&file, text).unwrap();
            })
        };
        let read = read_stable(&file, true);
        writer.join().unwrap();
        // Without policies in force an empty file is believed at once.
        std::fs::write(&file, "").unwrap();
        let empty = read_stable(&file, false);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(read.unwrap().as_deref(), Some(text));
        assert_eq!(empty.unwrap().as_deref(), Some(""));
    }

    #[test]
    fn a_missing_file_is_told_apart_from_an_empty_one() {
        assert!(
            load(Path::new("/nonexistent/kad.toml"), Path::new(ROOT), false)
                .unwrap()
                .is_none()
        );
        let dir = std::env::temp_dir().join(format!("kad-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("kad.toml");
        std::fs::write(&file, "").unwrap();
        let loaded = load(&file, Path::new(ROOT), false);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(loaded.unwrap(), Some(BTreeMap::new()));
    }
}
