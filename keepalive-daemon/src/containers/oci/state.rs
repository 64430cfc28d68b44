//! What the runtime hands the hook: the container's OCI state on stdin, and the stage, given
//! as an argument or implied by the container's status.
use std::{collections::BTreeMap, io::Read, path::PathBuf};

use serde::Deserialize;

use super::OciError;

/// An OCI state is a few KiB; anything far larger is not one.
const MAX_STATE_BYTES: u64 = 1 << 20;

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

/// Container ids name the record file (a file name: at most 255 bytes): runtimes use hex or
/// names of these characters.
pub(super) fn check_id(id: &str) -> Result<(), OciError> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
