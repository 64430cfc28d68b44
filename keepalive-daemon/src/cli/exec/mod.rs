//! `kad exec`: runs a command in a transient cgroup with a keepalive policy, the way
//! libkeepalive users prefix a command, for static binaries too. The policy comes from the
//! flags and libkeepalive's variables ([`policy_from`]); the cgroup, the command's process
//! and the signals passed on to it are in `process`.
mod policy;
mod process;

use std::{
    ffi::OsString,
    io,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use clap::Args;

pub use policy::{policy_from, Flags};
pub use process::{
    block_signals, exit_code, forward_signals, spawn_in, TransientCgroup, TRANSIENT_PREFIX,
};

use super::{args::ValueArgs, one_line};
use crate::{
    api::client::{self, ClientError},
    api::protocol::Request,
    host::cgroup::{self, CgroupError},
    model::policy::{Policy, PolicyError},
};

#[derive(Debug, Args)]
pub(super) struct ExecArgs {
    #[command(flatten)]
    pub(super) values: ValueArgs,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<OsString>,
}

/// `kad exec`: the command's exit status becomes ours (128+N when killed by signal N).
pub(super) fn command(socket: &Path, args: ExecArgs) -> anyhow::Result<ExitCode> {
    let policy = policy_from(args.values.flags(), |name| std::env::var_os(name))?;
    let Some((program, program_args)) = args.command.split_first() else {
        anyhow::bail!("missing command: kad exec [OPTIONS] -- CMD [ARGS...]");
    };
    let finished = run(socket, policy, program, program_args)?;
    if let Some(e) = &finished.spawn_error {
        eprintln!("kad: {}: {e}", program.to_string_lossy());
    }
    if let Some(e) = finished.cleanup_error {
        eprintln!(
            "kad: warning: the command is done, but its policy could not be removed ({}); the daemon removes it and the cgroup once it runs again",
            one_line(&anyhow::Error::new(e))
        );
    }
    Ok(ExitCode::from(finished.code))
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("{var}={value}: {message}")]
    BadEnv {
        var: &'static str,
        value: String,
        message: String,
    },
    #[error("KEEPALIVE=off conflicts with {0}")]
    OffWithValues(&'static str),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("cannot create the transient cgroup {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "kad exec as uid {uid} makes its cgroup below your own, {parent}, which is not delegated \
         to you ({source}); run it in a cgroup that is, e.g. `systemd-run --user --scope kad \
         exec ...`, or as root"
    )]
    NotDelegated {
        uid: u32,
        parent: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Daemon(#[from] ClientError),
    #[error("waiting for the command: {0}")]
    Wait(#[source] io::Error),
}

/// How a `kad exec` run ended.
#[derive(Debug)]
pub struct Finished {
    /// kad's exit status: the command's (128+N when signal N killed it), 127 when it could not
    /// be found, 126 when it could not be run.
    pub code: u8,
    /// Why the command could not be started, if it was not.
    pub spawn_error: Option<io::Error>,
    /// Why the policy could not be removed afterwards (the daemon died meanwhile, say). The
    /// daemon removes it when it runs again: it recorded this run as the owner.
    pub cleanup_error: Option<ClientError>,
}

/// `kad exec`: runs `program` in a transient cgroup with `policy`, through the daemon at
/// `socket`, and returns once the command and everything it started have exited and the
/// cgroup is removed. Errors before the command starts are errors; after, the command's
/// status wins and a failed clean-up is reported alongside it.
pub fn run(
    socket: &Path,
    policy: Policy,
    program: &OsString,
    args: &[OsString],
) -> Result<Finished, ExecError> {
    // Fail before creating anything when there is no daemon (the error says how to start one).
    client::call(socket, &Request::Status)?;
    let root = cgroup::find_root()?;
    // Before any thread exists, so that every thread has them blocked.
    let signals = block_signals();
    let transient = TransientCgroup::create(&root)?;
    // Relative to the cgroup2 root: the same cgroup for a daemon whose mount is elsewhere.
    let cgroup = transient
        .path
        .strip_prefix(&root)
        .unwrap_or(&transient.path)
        .display()
        .to_string();
    client::call(
        socket,
        &Request::Exec {
            cgroup: cgroup.clone(),
            policy,
        },
    )?;
    let (code, spawn_error) = match spawn_in(&transient, program, args) {
        Ok(mut child) => {
            forward_signals(signals, child.id() as i32, transient.path.clone());
            let status = child.wait().map_err(ExecError::Wait)?;
            (exit_code(status), None)
        }
        // As a shell: 127 when the command is not found, 126 when it cannot be run.
        Err(e) if e.kind() == io::ErrorKind::NotFound => (127, Some(e)),
        Err(e) => (126, Some(e)),
    };
    // The policy and cgroup go once the command and everything it left behind are gone.
    while transient.populated() {
        std::thread::sleep(Duration::from_millis(50));
    }
    let cleanup_error = client::call(socket, &Request::Unset { cgroup }).err();
    drop(transient);
    Ok(Finished {
        code,
        spawn_error,
        cleanup_error,
    })
}
