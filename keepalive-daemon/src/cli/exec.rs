//! `kad exec`: runs a command in a transient cgroup with a keepalive policy, the way
//! libkeepalive users prefix a command, for static binaries too.
use std::{
    ffi::OsString,
    fs::File,
    io,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use crate::{
    api::client::{self, ClientError},
    api::protocol::Request,
    host::cgroup::{self, CgroupError},
    model::policy::{self, Policy, CNT_RANGE, SECS_RANGE, USER_TIMEOUT_RANGE},
};

/// Transient cgroups are named this followed by the pid of the `kad exec` that made them. The
/// name is for people: the daemon goes by the owner it recorded (`ExecOwner`), never by a name.
pub const TRANSIENT_PREFIX: &str = "kad-exec-";

/// The signals kad passes on to the command.
const FORWARDED: [i32; 7] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
];

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
    Policy(#[from] policy::PolicyError),
    #[error("cannot create the transient cgroup {path}: {source}")]
    Create {
        path: PathBuf,
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

/// Values given on the command line; `None` falls back to the environment.
#[derive(Debug, Default, Clone, Copy)]
pub struct Flags {
    pub idle: Option<u32>,
    pub intvl: Option<u32>,
    pub cnt: Option<u32>,
    pub user_timeout: Option<u32>,
    pub enforce: bool,
    pub off: bool,
}

/// The policy for `kad exec`: flags first, then libkeepalive's variables (KEEPIDLE, KEEPINTVL,
/// KEEPCNT, TCP_USER_TIMEOUT, KEEPALIVE=off). A bad value is an error naming the variable. An
/// empty variable counts as unset.
pub fn policy_from(
    flags: Flags,
    env: impl Fn(&str) -> Option<OsString>,
) -> Result<Policy, ExecError> {
    let var = |name: &'static str| -> Result<Option<String>, ExecError> {
        match env(name) {
            None => Ok(None),
            Some(v) => {
                let v = v.into_string().map_err(|v| ExecError::BadEnv {
                    var: name,
                    value: v.to_string_lossy().into_owned(),
                    message: "not valid UTF-8".into(),
                })?;
                Ok(Some(v).filter(|v| !v.trim().is_empty()))
            }
        }
    };
    let number = |name: &'static str, range| -> Result<Option<u32>, ExecError> {
        var(name)?
            .map(|v| {
                policy::parse_value(name, &v, range).map_err(|e| ExecError::BadEnv {
                    var: name,
                    value: v.clone(),
                    message: e.to_string().replacen(name, "the value", 1),
                })
            })
            .transpose()
    };
    let env_off = match var("KEEPALIVE")? {
        None => false,
        Some(v) if v.eq_ignore_ascii_case("off") => true,
        Some(v) if v.eq_ignore_ascii_case("on") => false,
        Some(v) => {
            return Err(ExecError::BadEnv {
                var: "KEEPALIVE",
                value: v,
                message: "must be 'on' or 'off'".into(),
            })
        }
    };
    // Read every variable so that a bad one is reported even when a flag overrides it.
    let (env_idle, env_intvl, env_cnt, env_user_timeout) = (
        number("KEEPIDLE", SECS_RANGE)?,
        number("KEEPINTVL", SECS_RANGE)?,
        number("KEEPCNT", CNT_RANGE)?,
        number("TCP_USER_TIMEOUT", USER_TIMEOUT_RANGE)?,
    );
    if flags.off {
        if flags.enforce {
            return Err(policy::PolicyError::OffWithEnforce.into());
        }
        return Ok(Policy::OFF);
    }
    if env_off {
        for (name, given) in [
            ("--idle", flags.idle),
            ("--intvl", flags.intvl),
            ("--cnt", flags.cnt),
            ("--user-timeout", flags.user_timeout),
        ] {
            if given.is_some() {
                return Err(ExecError::OffWithValues(name));
            }
        }
        if flags.enforce {
            return Err(ExecError::OffWithValues("--enforce"));
        }
        return Ok(Policy::OFF);
    }
    Ok(Policy::on(
        flags.idle.or(env_idle),
        flags.intvl.or(env_intvl),
        flags.cnt.or(env_cnt),
    )?
    .with_extras(flags.user_timeout.or(env_user_timeout), flags.enforce)?)
}

/// A transient cgroup, below the caller's own, removed (when empty) on drop.
pub struct TransientCgroup {
    pub path: PathBuf,
}

impl TransientCgroup {
    pub fn create(root: &Path) -> Result<TransientCgroup, ExecError> {
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|t| crate::host::target::cgroup_from_proc(&t).map(str::to_string))
            .unwrap_or_else(|| "/".into());
        let path = root
            .join(own.trim_start_matches('/'))
            .join(format!("{TRANSIENT_PREFIX}{}", std::process::id()));
        std::fs::create_dir(&path).map_err(|source| ExecError::Create {
            path: path.clone(),
            source,
        })?;
        Ok(TransientCgroup { path })
    }

    /// Whether processes remain in the cgroup (or below it).
    pub fn populated(&self) -> bool {
        cgroup::populated(&self.path)
    }
}

/// The processes directly in the cgroup at `path`.
fn pids_in(path: &Path) -> Vec<i32> {
    std::fs::read_to_string(path.join("cgroup.procs"))
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

impl Drop for TransientCgroup {
    fn drop(&mut self) {
        // rmdir fails while processes remain; the caller waits for them first.
        for _ in 0..100 {
            match std::fs::remove_dir(&self.path) {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => return,
            }
        }
    }
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
    let cgroup = transient.path.display().to_string();
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

/// How the command ended, as a shell reports it.
pub fn exit_code(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(signal)) => (128 + signal) as u8,
        _ => 1,
    }
}

/// Blocks the forwarded signals in this thread (and the threads it starts); call before any
/// thread is started.
pub fn block_signals() -> libc::sigset_t {
    // SAFETY: plain sigset manipulation on a value we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in FORWARDED {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Starts `program` in `cgroup` with the signal mask cleared.
pub fn spawn_in(
    cgroup: &TransientCgroup,
    program: &OsString,
    args: &[OsString],
) -> io::Result<std::process::Child> {
    let procs = File::options()
        .write(true)
        .open(cgroup.path.join("cgroup.procs"))?;
    let fd = procs.as_raw_fd();
    let mut command = Command::new(program);
    command.args(args);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn();
    drop(procs);
    child
}

/// Passes the blocked signals on: to the command while it runs, then to what it left in the
/// cgroup. Signals the kernel sent to the whole process group (a terminal's ^C) reached the
/// command already and are not sent twice.
pub fn forward_signals(set: libc::sigset_t, child: i32, cgroup: PathBuf) {
    std::thread::spawn(move || loop {
        // SAFETY: siginfo is written by sigwaitinfo; the set outlives the call.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let signal = unsafe { libc::sigwaitinfo(&set, &mut info) };
        if signal < 0 {
            continue;
        }
        if info.si_code == libc::SI_KERNEL {
            continue;
        }
        // SAFETY: kill(2) with a pid we started; ESRCH once it is gone is fine.
        if unsafe { libc::kill(child, signal) } != 0 {
            for pid in pids_in(&cgroup) {
                // SAFETY: as above.
                unsafe { libc::kill(pid, signal) };
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn with_env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).map(OsString::from)
    }

    #[test]
    fn flags_win_over_the_environment() {
        let env = with_env(&[("KEEPIDLE", "100"), ("KEEPINTVL", "10"), ("KEEPCNT", "3")]);
        let flags = Flags {
            idle: Some(200),
            ..Flags::default()
        };
        assert_eq!(
            policy_from(flags, &env).unwrap(),
            Policy::on(Some(200), Some(10), Some(3)).unwrap()
        );
        assert_eq!(
            policy_from(Flags::default(), with_env(&[])).unwrap(),
            Policy::on(None, None, None).unwrap()
        );
    }

    #[test]
    fn tcp_user_timeout_comes_from_the_environment_like_libkeepalive() {
        let env = with_env(&[("TCP_USER_TIMEOUT", "30000"), ("KEEPIDLE", "10")]);
        assert_eq!(
            policy_from(Flags::default(), &env).unwrap(),
            Policy::on(Some(10), None, None)
                .unwrap()
                .with_extras(Some(30000), false)
                .unwrap()
        );
        let flags = Flags {
            user_timeout: Some(500),
            enforce: true,
            ..Flags::default()
        };
        let policy = policy_from(flags, &env).unwrap();
        assert_eq!((policy.user_timeout, policy.enforce), (Some(500), true));
        for bad in ["abc", "0", "-1", "2147483648"] {
            let err = policy_from(Flags::default(), with_env(&[("TCP_USER_TIMEOUT", bad)]))
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with(&format!("TCP_USER_TIMEOUT={bad}:"))
                    && err.contains("between 1 and 2147483647"),
                "{err}"
            );
        }
        let off_enforced = Flags {
            off: true,
            enforce: true,
            ..Flags::default()
        };
        assert!(policy_from(off_enforced, with_env(&[]))
            .unwrap_err()
            .to_string()
            .contains("--enforce"));
        let enforced = Flags {
            enforce: true,
            ..Flags::default()
        };
        assert!(policy_from(enforced, with_env(&[("KEEPALIVE", "off")]))
            .unwrap_err()
            .to_string()
            .contains("--enforce"));
    }

    #[test]
    fn keepalive_off_and_bad_values() {
        assert_eq!(
            policy_from(Flags::default(), with_env(&[("KEEPALIVE", "OFF")])).unwrap(),
            Policy::OFF
        );
        assert_eq!(
            policy_from(Flags::default(), with_env(&[("KEEPIDLE", "")])).unwrap(),
            Policy::on(None, None, None).unwrap()
        );
        let err = policy_from(Flags::default(), with_env(&[("KEEPIDLE", "abc")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("KEEPIDLE=abc:") && err.contains("between 1 and 32767"),
            "{err}"
        );
        let err = policy_from(Flags::default(), with_env(&[("KEEPCNT", "500")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("KEEPCNT=500:") && err.contains("127"),
            "{err}"
        );
        let err = policy_from(Flags::default(), with_env(&[("KEEPALIVE", "maybe")]))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("KEEPALIVE=maybe"), "{err}");
        let flags = Flags {
            cnt: Some(3),
            ..Flags::default()
        };
        let err = policy_from(flags, with_env(&[("KEEPALIVE", "off")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--cnt"), "{err}");
        let off = Flags {
            off: true,
            ..Flags::default()
        };
        assert_eq!(
            policy_from(off, with_env(&[("KEEPIDLE", "5")])).unwrap(),
            Policy::OFF
        );
    }
}
