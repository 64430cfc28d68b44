//! `kad oci-hook`: an OCI runtime hook (podman, CRI-O, anything that reads `hooks.d`). At
//! `createRuntime` it has the daemon put the container's `kad.dev/keepalive` annotation in force
//! on the container's cgroup, before the container's process runs; at `poststop` it removes it.
//!
//! The runtime gives the hook the container's state (id, pid, bundle, annotations) on stdin
//! (`state`); the cgroup comes from `linux.cgroupsPath` in the bundle's `config.json`
//! (`cgroups_path`); what the hook set is kept per container id (`record`) for `poststop`.
use std::{
    fs, io,
    path::{Path, PathBuf},
};

use crate::{
    api::client::{self, ClientError},
    api::protocol::{Request, Response},
    containers::annotation::{self, AnnotationError},
    host::target,
    model::policy::Policy,
};

mod cgroups_path;
mod record;
mod state;

pub use cgroups_path::{cgroup_from_cgroups_path, container_cgroup};
pub use state::{read_state, Stage, State};

/// Where the hook records which cgroup it gave a policy, per container id.
pub const DEFAULT_RUN_DIR: &str = "/run/kad/oci-hooks";

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
    /// The container stopped: its policy waits for its next start, and goes when it is removed.
    Kept {
        cgroup: String,
    },
    /// poststop found nothing to remove (a second poststop: podman runs it at stop and at rm).
    NothingToRemove,
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
    state::check_id(&state.id)?;
    let record = run_dir.join(&state.id);
    match Stage::from(stage, &state.status)? {
        Stage::Apply => apply(socket, &record, &state),
        Stage::Remove => remove(socket, &record, &state),
    }
}

fn apply(socket: &Path, record: &Path, state: &State) -> Result<Outcome, OciError> {
    // `podman run --annotation kad.dev/keepalive=idle=1,cnt=2` gives kad.dev/keepalive=idle=1
    // and cnt=2: put back together.
    let Some(value) = annotation::value_of(&state.annotations) else {
        return Ok(Outcome::NotAnnotated);
    };
    let policy = annotation::parse(&value).map_err(|source| OciError::Annotation {
        id: state.id.clone(),
        source,
    })?;
    let cgroup = container_cgroup(state)?;
    // Recorded first: if the record cannot be written, nothing is set that poststop would miss.
    record::write(record, &cgroup).map_err(|source| OciError::Record {
        id: state.id.clone(),
        path: record.to_path_buf(),
        source,
    })?;
    let request = Request::Set {
        cgroup: cgroup.clone(),
        policy,
        container: Some(state.id.clone()),
    };
    match client::call(socket, &request) {
        Ok(Response::Done { cgroup, .. }) => Ok(Outcome::Applied { cgroup, policy }),
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
        Ok(bytes) => match record::parse(&bytes) {
            Some(cgroup) => cgroup,
            // A damaged record: fall back on the container's config, as without one.
            None => match cgroups_path::fallback_cgroup(state) {
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
            match cgroups_path::fallback_cgroup(state) {
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
    let unset = Request::Unset {
        cgroup: cgroup.clone(),
    };
    // The daemon keeps the policy (and its counters) while the container's bundle exists: a
    // stop, not a removal, which runs this same stage. A daemon of the previous release
    // removes it, as it always did.
    let reply = match &state.bundle {
        Some(bundle) => match client::call(
            socket,
            &Request::ContainerStopped {
                cgroup: cgroup.clone(),
                container: state.id.clone(),
                bundle: bundle.display().to_string(),
            },
        ) {
            Err(ClientError::Refused(message))
                if client::is_unknown(&message, "variant", "container_stopped") =>
            {
                client::call(socket, &unset).map(|_| false)
            }
            other => other.map(|_| true),
        },
        None => client::call(socket, &unset).map(|_| false),
    };
    let outcome = match reply {
        Ok(true) => Outcome::Kept { cgroup },
        Ok(false) => Outcome::Removed { cgroup },
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

#[cfg(test)]
mod tests {
    use super::*;

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
        // What podman makes of --annotation kad.dev/keepalive=idle=5,cnt=0: checked whole.
        let split = br#"{"id":"abc","status":"creating","bundle":"/nonexistent",
            "annotations":{"kad.dev/keepalive":"idle=5","cnt":"0"}}"#;
        let err = run(Path::new("/x"), &dir, None, split)
            .unwrap_err()
            .to_string();
        assert!(err.contains(r#"kad.dev/keepalive="idle=5,cnt=0""#), "{err}");
        assert!(err.contains("between 1 and 127"), "{err}");
    }
}
