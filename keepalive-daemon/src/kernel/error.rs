//! What can go wrong on the kernel side, and how aya's errors are put into words.
use std::{io, path::PathBuf};

use keepalive_common::MAX_POLICIES;
use tracing::debug;

use crate::host::pathio::PathIoError;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("bpffs is not mounted at {mount} (needed for {dir}): mount it with `mount -t bpf bpf {mount}`")]
    NoBpffs { dir: PathBuf, mount: PathBuf },
    #[error("{dir} is not on a bpf filesystem")]
    NotBpffs { dir: PathBuf },
    #[error("{0} is the root of a bpf filesystem: kad needs a directory of its own on it (--bpffs {0}/kad, say)")]
    BpffsRoot(PathBuf),
    #[error("{0} is on a bpf filesystem that only this daemon's namespaces would have (one it would mount itself outside the host's mount and PID namespaces, or another mount namespace's), not the host's: its pins, and every policy with them, would go with the namespace. Give the daemon the host's bpffs (bind-mount /sys/fs/bpf), or start it with --private-bpffs if enforcement may end with it")]
    PrivateBpffs(PathBuf),
    #[error("a kad daemon is already using {0}: stop it first, or give this one its own --bpffs directory")]
    Busy(PathBuf),
    #[error(transparent)]
    Io(#[from] PathIoError),
    #[error("cannot load the {program} program: {message}")]
    Load {
        program: &'static str,
        message: String,
    },
    #[error("cannot attach to {path}: {message}")]
    Attach { path: PathBuf, message: String },
    #[error(
        "cannot use the pin {path}: {source} (left in place; enforcement continues through it)"
    )]
    Pin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("BPF map {map}: {message}")]
    Map { map: &'static str, message: String },
    #[error("the pinned map {0} is gone (removed by hand?): restart the daemon to re-create it and re-apply every policy")]
    MapGone(PathBuf),
    #[error("too many policies: kad holds at most {MAX_POLICIES}")]
    Full,
    #[error("cannot update existing connections: {0}")]
    Refresh(String),
}

pub(super) fn load_error(program: &'static str, error: &dyn std::error::Error) -> KernelError {
    KernelError::Load {
        program,
        message: error_chain(error),
    }
}

pub(super) fn map_error(map: &'static str, error: aya::maps::MapError) -> KernelError {
    KernelError::Map {
        map,
        message: error_chain(&error),
    }
}

/// A failed insert into a full map says so, with the limit; others keep the errno.
pub(super) fn full_or(map: &'static str, error: aya::maps::MapError) -> KernelError {
    let message = error_chain(&error);
    if message.contains("E2BIG") || message.contains("os error 7") {
        return KernelError::Full;
    }
    KernelError::Map { map, message }
}

/// Why a feature is off, for `kad status` and the start's log: a verifier log (hundreds of
/// lines) is cut to the line that says what the kernel lacks, and the kernel version the
/// feature needs is named. The whole log goes to the debug log.
pub(super) fn brief(what: &str, needs: &str, reason: &str) -> String {
    let Some((head, log)) = reason.split_once("Verifier output:") else {
        return format!("{reason}; needs {needs}");
    };
    debug!("{what}: the verifier's output: {log}");
    let lines: Vec<&str> = log.lines().map(str::trim).collect();
    // The verifier ends with its statistics; the line before them is its verdict.
    let end = lines
        .iter()
        .position(|l| l.starts_with("verification time") || l.starts_with("processed "))
        .unwrap_or(lines.len());
    let verdict = lines[..end]
        .iter()
        .rev()
        .find(|l| !l.is_empty())
        .copied()
        .unwrap_or("(no verdict in its output)");
    format!(
        "{}; the verifier: {verdict}; needs {needs}",
        head.trim().trim_end_matches('.')
    )
}

/// aya's errors keep the useful part (the errno, the verifier log) in their sources.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verifier_log_is_cut_to_its_verdict() {
        // As 5.10 refuses the iter/tcp program (shortened).
        let reason = "cannot load the iter/tcp program: the BPF_PROG_LOAD syscall returned \
                      Invalid argument (os error 22). Verifier output: arg#0 type is not a \
                      struct\n0: (bf) r2 = r1\n106: (85) call bpf_setsockopt#49\n\
                      unknown func bpf_setsockopt#49\nverification time 1446 usec\n\
                      stack depth 40\nprocessed 80 insns (limit 1000000)\n: Invalid argument \
                      (os error 22)";
        assert_eq!(
            brief("existing connections", "Linux 5.15", reason),
            "cannot load the iter/tcp program: the BPF_PROG_LOAD syscall returned Invalid \
             argument (os error 22); the verifier: unknown func bpf_setsockopt#49; needs \
             Linux 5.15"
        );
        assert_eq!(
            brief("keepalive kills", "Linux 5.14", "unknown BTF type `x`"),
            "unknown BTF type `x`; needs Linux 5.14"
        );
    }
}
