//! The command of a `kad exec` run: the transient cgroup it runs in, starting it there,
//! passing kad's signals on to it, and its exit status.
use std::{
    ffi::OsString,
    fs::File,
    io,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use super::ExecError;
use crate::host::cgroup;

pub use crate::host::process::TRANSIENT_PREFIX;

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
        std::fs::create_dir(&path).map_err(|source| {
            // SAFETY: getuid has no preconditions.
            let uid = unsafe { libc::getuid() };
            match (uid, source.kind()) {
                (1.., io::ErrorKind::PermissionDenied) => ExecError::NotDelegated {
                    uid,
                    parent: path.parent().unwrap_or(root).to_path_buf(),
                    source,
                },
                _ => ExecError::Create {
                    path: path.clone(),
                    source,
                },
            }
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
