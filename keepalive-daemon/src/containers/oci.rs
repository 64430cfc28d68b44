//! `kad oci-hook`: an OCI runtime hook (podman, CRI-O, anything that reads `hooks.d`). At
//! `createRuntime` it has the daemon put the container's `kad.dev/keepalive` annotation in force
//! on the container's cgroup, before the container's process runs; at `poststop` it removes it.
//!
//! The runtime gives the hook the container's state (id, pid, bundle, annotations) on stdin;
//! the cgroup comes from `linux.cgroupsPath` in the bundle's `config.json`.
use std::{
    collections::BTreeMap,
    fs,
    io::{self, Read, Write as _},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    api::client::{self, ClientError},
    api::protocol::{Request, Response},
    containers::annotation::{self, AnnotationError},
    host::target,
    model::policy::Policy,
};

/// Where the hook records which cgroup it gave a policy, per container id.
pub const DEFAULT_RUN_DIR: &str = "/run/kad/oci-hooks";
/// An OCI state is a few KiB; anything far larger is not one.
const MAX_STATE_BYTES: u64 = 1 << 20;
const MAX_CONFIG_BYTES: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("cannot read the OCI state on stdin: {0}")]
    ReadState(#[source] io::Error),
    #[error("the OCI state on stdin is not valid: {0}")]
    BadState(String),
    #[error("invalid container id {0:?} in the OCI state")]
    BadId(String),
    #[error("unknown hook stage '{0}': give createRuntime, prestart or poststop")]
    BadStage(String),
    #[error("cannot tell the hook stage from the container status '{0}': give it as an argument (createRuntime or poststop)")]
    UnknownStatus(String),
    #[error("container {id}: {source}")]
    Annotation {
        id: String,
        #[source]
        source: AnnotationError,
    },
    #[error("container {id}: annotation {KEY}={value:?} arrived split at its commas, the rest as the annotations {stray}: podman's --annotation splits a value at commas; quote it whole: --annotation '\"{KEY}={value},...\"'", KEY = annotation::KEY)]
    Split {
        id: String,
        value: String,
        stray: String,
    },
    #[error("cannot read {path}: {source}")]
    Config {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a valid OCI config: {message}")]
    BadConfig { path: PathBuf, message: String },
    #[error("container {id}: no linux.cgroupsPath in {config} and no running process to find its cgroup from")]
    NoCgroup { id: String, config: PathBuf },
    #[error("invalid cgroups path {0:?}: {1}")]
    BadCgroupsPath(String, &'static str),
    #[error("container {id}: cannot find its cgroup from process {pid}: {source}")]
    Pid {
        id: String,
        pid: u32,
        #[source]
        source: target::TargetError,
    },
    #[error("container {id}: cannot record its policy in {path}: {source}")]
    Record {
        id: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("container {id}: the {KEY} policy for {cgroup} could not be put in force, so the container does not start: {source}", KEY = annotation::KEY)]
    Set {
        id: String,
        cgroup: String,
        #[source]
        source: ClientError,
    },
    #[error("container {id}: the {KEY} policy for {cgroup} could not be removed: {source}", KEY = annotation::KEY)]
    Unset {
        id: String,
        cgroup: String,
        #[source]
        source: ClientError,
    },
}

/// The part of the OCI state (runtime-spec `state.json` schema) the hook reads.
#[derive(Debug, Clone, Deserialize)]
pub struct State {
    pub id: String,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub pid: Option<i64>,
    #[serde(default)]
    pub bundle: Option<PathBuf>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// What the hook does at a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// createRuntime (or the older prestart): put the policy in force.
    Apply,
    /// poststop: remove it.
    Remove,
}

impl Stage {
    /// The stage given on the command line (hooks.d passes it in `args`), or else the one the
    /// container's status implies: "creating"/"created" before the process runs, "stopped" after.
    pub fn from(arg: Option<&str>, status: &str) -> Result<Stage, OciError> {
        match arg {
            Some("createRuntime" | "prestart") => Ok(Stage::Apply),
            Some("poststop") => Ok(Stage::Remove),
            Some(other) => Err(OciError::BadStage(other.to_string())),
            None => match status {
                "creating" | "created" => Ok(Stage::Apply),
                "stopped" => Ok(Stage::Remove),
                other => Err(OciError::UnknownStatus(other.to_string())),
            },
        }
    }
}

/// What one run of the hook did, for its one line of output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The container has no `kad.dev/keepalive` annotation (and no recorded policy).
    NotAnnotated,
    Applied {
        cgroup: String,
        policy: Policy,
    },
    Removed {
        cgroup: String,
    },
    /// poststop found nothing to remove (a second poststop: podman runs it at stop and at rm).
    NothingToRemove,
}

/// The hook's record of a policy it set: the cgroup, so that `poststop` removes exactly that.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    cgroup: String,
}

/// Runs the hook: `state` is the runtime's JSON, `stage` the argument if any.
pub fn run(
    socket: &Path,
    run_dir: &Path,
    stage: Option<&str>,
    state: &[u8],
) -> Result<Outcome, OciError> {
    let state: State =
        serde_json::from_slice(state).map_err(|e| OciError::BadState(e.to_string()))?;
    check_id(&state.id)?;
    let record = run_dir.join(&state.id);
    match Stage::from(stage, &state.status)? {
        Stage::Apply => apply(socket, &record, &state),
        Stage::Remove => remove(socket, &record, &state),
    }
}

/// Reads the state from stdin, within a size limit.
pub fn read_state(input: impl Read) -> Result<Vec<u8>, OciError> {
    let mut buf = Vec::new();
    input
        .take(MAX_STATE_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(OciError::ReadState)?;
    if buf.len() as u64 > MAX_STATE_BYTES {
        return Err(OciError::BadState(format!(
            "larger than {MAX_STATE_BYTES} bytes"
        )));
    }
    Ok(buf)
}

fn apply(socket: &Path, record: &Path, state: &State) -> Result<Outcome, OciError> {
    let Some(value) = state.annotations.get(annotation::KEY) else {
        return Ok(Outcome::NotAnnotated);
    };
    // `podman run --annotation k=idle=1,cnt=2` gives k=idle=1 and cnt=2: refused, not run
    // with half a policy.
    let stray: Vec<&str> = ["idle", "intvl", "cnt", "user-timeout", "enforce", "on"]
        .into_iter()
        .filter(|k| state.annotations.contains_key(*k))
        .collect();
    if !stray.is_empty() {
        return Err(OciError::Split {
            id: state.id.clone(),
            value: value.chars().take(80).collect(),
            stray: stray.join(", "),
        });
    }
    let policy = annotation::parse(value).map_err(|source| OciError::Annotation {
        id: state.id.clone(),
        source,
    })?;
    let cgroup = container_cgroup(state)?;
    // Recorded first: if the record cannot be written, nothing is set that poststop would miss.
    write_record(record, &cgroup).map_err(|source| OciError::Record {
        id: state.id.clone(),
        path: record.to_path_buf(),
        source,
    })?;
    let request = Request::Set {
        cgroup: cgroup.clone(),
        policy,
    };
    match client::call(socket, &request) {
        Ok(Response::Done { cgroup }) => Ok(Outcome::Applied { cgroup, policy }),
        Ok(_) => Ok(Outcome::Applied { cgroup, policy }),
        Err(source) => {
            let _ = fs::remove_file(record);
            Err(OciError::Set {
                id: state.id.clone(),
                cgroup,
                source,
            })
        }
    }
}

fn remove(socket: &Path, record: &Path, state: &State) -> Result<Outcome, OciError> {
    let cgroup = match fs::read(record) {
        Ok(bytes) => match serde_json::from_slice::<Record>(&bytes) {
            Ok(r) => r.cgroup,
            // A damaged record: fall back on the container's config, as without one.
            Err(_) => match fallback_cgroup(state) {
                Some(c) => c,
                None => return Ok(Outcome::NothingToRemove),
            },
        },
        // No record: a second poststop (podman runs it at stop and again at rm), or a record
        // lost with /run. Without the annotation there is nothing of ours to remove.
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if !state.annotations.contains_key(annotation::KEY) {
                return Ok(Outcome::NotAnnotated);
            }
            match fallback_cgroup(state) {
                Some(c) => c,
                None => return Ok(Outcome::NothingToRemove),
            }
        }
        Err(source) => {
            return Err(OciError::Record {
                id: state.id.clone(),
                path: record.to_path_buf(),
                source,
            })
        }
    };
    let outcome = match client::call(
        socket,
        &Request::Unset {
            cgroup: cgroup.clone(),
        },
    ) {
        Ok(_) => Outcome::Removed { cgroup },
        Err(ClientError::Refused(message)) if message.starts_with("no policy for") => {
            Outcome::NothingToRemove
        }
        // The record stays, so that a later poststop (podman's at rm) tries again.
        Err(source) => {
            return Err(OciError::Unset {
                id: state.id.clone(),
                cgroup,
                source,
            })
        }
    };
    let _ = fs::remove_file(record);
    Ok(outcome)
}

/// The cgroup by the container's config, when poststop has no record; `None` if it cannot tell.
fn fallback_cgroup(state: &State) -> Option<String> {
    let config = config_path(state)?;
    cgroups_path_of(&config)
        .ok()
        .flatten()
        .and_then(|p| cgroup_from_cgroups_path(&p).ok())
}

fn config_path(state: &State) -> Option<PathBuf> {
    state.bundle.as_ref().map(|b| b.join("config.json"))
}

/// The container's cgroup, relative to the cgroup2 root: from `linux.cgroupsPath` in the
/// bundle's config.json, or else from the container's process.
pub fn container_cgroup(state: &State) -> Result<String, OciError> {
    let config = config_path(state).ok_or_else(|| OciError::BadState("no bundle".into()))?;
    if let Some(path) = cgroups_path_of(&config)? {
        return cgroup_from_cgroups_path(&path);
    }
    let pid = state
        .pid
        .and_then(|p| u32::try_from(p).ok())
        .filter(|&p| p > 0)
        .ok_or_else(|| OciError::NoCgroup {
            id: state.id.clone(),
            config: config.clone(),
        })?;
    let text =
        fs::read_to_string(format!("/proc/{pid}/cgroup")).map_err(|source| OciError::Pid {
            id: state.id.clone(),
            pid,
            source: target::TargetError::Proc { pid, source },
        })?;
    let path = target::cgroup_from_proc(&text).ok_or_else(|| OciError::Pid {
        id: state.id.clone(),
        pid,
        source: target::TargetError::NoCgroup2(pid),
    })?;
    cgroup_from_cgroups_path(path)
}

/// `linux.cgroupsPath` of an OCI config file, if it has one.
fn cgroups_path_of(config: &Path) -> Result<Option<String>, OciError> {
    #[derive(Deserialize)]
    struct Config {
        #[serde(default)]
        linux: Option<Linux>,
    }
    #[derive(Deserialize)]
    struct Linux {
        #[serde(default, rename = "cgroupsPath")]
        cgroups_path: Option<String>,
    }
    let io_err = |source| OciError::Config {
        path: config.to_path_buf(),
        source,
    };
    let mut bytes = Vec::new();
    fs::File::open(config)
        .map_err(io_err)?
        .take(MAX_CONFIG_BYTES)
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    let parsed: Config = serde_json::from_slice(&bytes).map_err(|e| OciError::BadConfig {
        path: config.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(parsed
        .linux
        .and_then(|l| l.cgroups_path)
        .filter(|p| !p.is_empty()))
}

/// The cgroup a runtime makes for `linux.cgroupsPath`, relative to the cgroup2 root:
/// - cgroupfs driver, a path: `/libpod_parent/libpod-ID` (podman),
///   `/kubepods/besteffort/podUID/crio-ID` (CRI-O);
/// - systemd driver, `SLICE:PREFIX:NAME`: the scope `PREFIX-NAME.scope` in the slice, whose
///   path systemd derives from its name (`a-b.slice` is `a.slice/a-b.slice`):
///   `machine.slice:libpod:ID` is `machine.slice/libpod-ID.scope`,
///   `kubepods-besteffort-podUID.slice:crio:ID` is
///   `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podUID.slice/crio-ID.scope`.
pub fn cgroup_from_cgroups_path(path: &str) -> Result<String, OciError> {
    let bad = |why| OciError::BadCgroupsPath(path.to_string(), why);
    if path.contains('\0') || path.contains('\n') {
        return Err(bad("a control character in it"));
    }
    let parts: Vec<&str> = path.split(':').collect();
    let relative = match parts.as_slice() {
        [single] => single.trim_matches('/').to_string(),
        [slice, prefix, name] => {
            if name.is_empty() || name.contains('/') || prefix.contains('/') {
                return Err(bad(
                    "systemd form SLICE:PREFIX:NAME with an empty or nested name",
                ));
            }
            let slice = if slice.is_empty() {
                "system.slice"
            } else {
                slice
            };
            let slice_path = expand_slice(slice).ok_or_else(|| bad("not a systemd slice name"))?;
            let unit = if name.ends_with(".slice") {
                // A slice's place follows from its name alone, whatever the parent given.
                return expand_slice(name)
                    .filter(|p| !p.is_empty())
                    .ok_or_else(|| bad("not a systemd slice name"));
            } else if prefix.is_empty() {
                format!("{name}.scope")
            } else {
                format!("{prefix}-{name}.scope")
            };
            if slice_path.is_empty() {
                unit
            } else {
                format!("{slice_path}/{unit}")
            }
        }
        _ => return Err(bad("neither a path nor SLICE:PREFIX:NAME")),
    };
    if relative.is_empty() {
        return Err(bad("the cgroup2 root"));
    }
    if relative
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(bad("an empty, '.' or '..' component"));
    }
    Ok(relative)
}

/// The path of a systemd slice below the root: `a-b-c.slice` is `a.slice/a-b.slice/a-b-c.slice`,
/// `-.slice` the root itself (""). `None` for a name that is not a slice.
pub fn expand_slice(slice: &str) -> Option<String> {
    if slice == "-.slice" {
        return Some(String::new());
    }
    let stem = slice.strip_suffix(".slice")?;
    if stem.is_empty() || stem.contains('/') || stem.starts_with('-') || stem.ends_with('-') {
        return None;
    }
    let mut path = Vec::new();
    let mut prefix = String::new();
    for part in stem.split('-') {
        if part.is_empty() {
            return None;
        }
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        path.push(format!("{prefix}.slice"));
    }
    Some(path.join("/"))
}

/// Container ids name the record file (a file name: at most 255 bytes): runtimes use hex or
/// names of these characters.
fn check_id(id: &str) -> Result<(), OciError> {
    let ok = !id.is_empty()
        && id.len() <= 200
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.+".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(OciError::BadId(id.chars().take(80).collect()))
    }
}

fn write_record(path: &Path, cgroup: &str) -> io::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroupfs_paths_are_relative_to_the_root() {
        assert_eq!(
            cgroup_from_cgroups_path("/libpod_parent/libpod-abc").unwrap(),
            "libpod_parent/libpod-abc"
        );
        assert_eq!(
            cgroup_from_cgroups_path("/kubepods/besteffort/pod1-2/crio-abc").unwrap(),
            "kubepods/besteffort/pod1-2/crio-abc"
        );
        for bad in ["/", "", "/a/../b", "/a//b", "a:b", "/x\n"] {
            assert!(cgroup_from_cgroups_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn systemd_paths_expand_their_slice() {
        assert_eq!(
            cgroup_from_cgroups_path("machine.slice:libpod:abc").unwrap(),
            "machine.slice/libpod-abc.scope"
        );
        assert_eq!(
            cgroup_from_cgroups_path("kubepods-besteffort-pod1_2.slice:crio:abc").unwrap(),
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1_2.slice/crio-abc.scope"
        );
        assert_eq!(
            cgroup_from_cgroups_path("system.slice:docker:abc").unwrap(),
            "system.slice/docker-abc.scope"
        );
        assert_eq!(
            cgroup_from_cgroups_path(":runc:abc").unwrap(),
            "system.slice/runc-abc.scope"
        );
        assert_eq!(
            cgroup_from_cgroups_path("-.slice:x:abc").unwrap(),
            "x-abc.scope"
        );
        assert_eq!(
            cgroup_from_cgroups_path("machine.slice:libpod:pod-x.slice").unwrap(),
            "pod.slice/pod-x.slice"
        );
        for bad in [
            "machine:libpod:abc",
            "a--b.slice:x:abc",
            "machine.slice:libpod:",
            "machine.slice:libpod:a/b",
            "a:b:c:d",
        ] {
            assert!(cgroup_from_cgroups_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn stages_from_args_or_status() {
        assert_eq!(
            Stage::from(Some("createRuntime"), "x").unwrap(),
            Stage::Apply
        );
        assert_eq!(Stage::from(Some("prestart"), "x").unwrap(), Stage::Apply);
        assert_eq!(
            Stage::from(Some("poststop"), "creating").unwrap(),
            Stage::Remove
        );
        assert_eq!(Stage::from(None, "creating").unwrap(), Stage::Apply);
        assert_eq!(Stage::from(None, "stopped").unwrap(), Stage::Remove);
        assert!(Stage::from(Some("poststart"), "running").is_err());
        assert!(Stage::from(None, "running").is_err());
    }

    #[test]
    fn ids_are_checked_before_naming_a_file() {
        assert!(check_id("8d2c46a4838bdc0bba93a66a").is_ok());
        assert!(check_id("my_ctr-1.2").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", "a b"] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_bad_annotation_is_refused_before_anything_else() {
        let dir = std::env::temp_dir().join(format!("kad-oci-unit-{}", std::process::id()));
        let state = br#"{"ociVersion":"1.0.2","id":"abc","status":"creating","pid":1,
            "bundle":"/nonexistent","annotations":{"kad.dev/keepalive":"idle=0"}}"#;
        let err = run(Path::new("/nonexistent.sock"), &dir, None, state)
            .unwrap_err()
            .to_string();
        assert!(err.contains("kad.dev/keepalive"), "{err}");
        assert!(err.contains("between 1 and 32767"), "{err}");
        assert!(!dir.exists());
        // Without the annotation the hook has nothing to do, at either stage.
        let plain = br#"{"id":"abc","status":"creating","bundle":"/nonexistent"}"#;
        assert_eq!(
            run(Path::new("/nonexistent.sock"), &dir, None, plain).unwrap(),
            Outcome::NotAnnotated
        );
        let stopped = br#"{"id":"abc","status":"stopped","bundle":"/nonexistent"}"#;
        assert_eq!(
            run(Path::new("/nonexistent.sock"), &dir, None, stopped).unwrap(),
            Outcome::NotAnnotated
        );
        assert!(run(Path::new("/x"), &dir, None, b"not json").is_err());
        // What podman makes of --annotation kad.dev/keepalive=idle=5,cnt=3.
        let split = br#"{"id":"abc","status":"creating","bundle":"/nonexistent",
            "annotations":{"kad.dev/keepalive":"idle=5","cnt":"3"}}"#;
        let err = run(Path::new("/x"), &dir, None, split)
            .unwrap_err()
            .to_string();
        assert!(err.contains("split at its commas"), "{err}");
        assert!(err.contains("kad.dev/keepalive"), "{err}");
    }
}
