//! The guard: everything the bench made, undone in reverse, whatever happened (an error, a
//! panic, ^C).
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Result};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// ^C or SIGTERM: stop at the next check, so the guard cleans up.
pub(super) fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sets ^C and SIGTERM to stop the bench at its next `check_interrupted`, not at once.
pub(super) fn stop_on_signals() {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
}

/// What the bench made so far, for `drop` to undo.
#[derive(Default)]
pub(super) struct Guard {
    /// Cgroups made by the bench, children of the cgroup2 root (removed with what is below).
    pub(super) cgroups: Vec<PathBuf>,
    /// C programs attached with bpftool: (cgroup, pin).
    pub(super) attached: Vec<(PathBuf, PathBuf)>,
    pub(super) bpffs: Option<PathBuf>,
    pub(super) tmp: Option<PathBuf>,
    pub(super) daemon: Option<Child>,
    /// (kad binary, --bpffs, --state-dir) for `kad uninstall`.
    pub(super) uninstall: Option<(PathBuf, PathBuf, PathBuf)>,
    pub(super) children: Vec<Child>,
    /// The network namespace the connections are made in (`ip netns`).
    pub(super) netns: Option<String>,
    /// `STATS_KNOB` as it was before the bench switched it on.
    pub(super) stats_before: Option<String>,
    /// The bench's dockerd: (process, socket, directory).
    pub(super) dockerd: Option<(Child, PathBuf, PathBuf)>,
    /// Cgroups runc also made in each cgroup v1 hierarchy (names below their roots).
    pub(super) v1_cgroups: Vec<String>,
}

/// The kernel's accounting of BPF program runs (off by default: it costs every run).
pub(super) const STATS_KNOB: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some((dockerd, socket, dir)) = self.dockerd.take() {
            stop_dockerd(dockerd, &socket, &dir);
        }
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Whatever is still in the bench's cgroups (a worker of a failed round).
        for cgroup in &self.cgroups {
            let _ = std::fs::write(cgroup.join("cgroup.kill"), "1");
        }
        if let Some(netns) = &self.netns {
            let _ = Command::new("ip").args(["netns", "delete", netns]).status();
        }
        if let Some(mut daemon) = self.daemon.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(daemon.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
        if let Some((kad, bpffs, state)) = &self.uninstall {
            let _ = Command::new(kad)
                .arg("uninstall")
                .arg("--bpffs")
                .arg(bpffs)
                .arg("--state-dir")
                .arg(state)
                .arg("--purge")
                .stdout(Stdio::null())
                .status();
        }
        for (cgroup, pin) in self.attached.iter().rev() {
            let _ = Command::new("bpftool")
                .args(["cgroup", "detach"])
                .arg(cgroup)
                .args(["sock_ops", "pinned"])
                .arg(pin)
                .status();
            let _ = std::fs::remove_file(pin);
        }
        if let Some(dir) = &self.bpffs {
            let _ = std::fs::remove_dir_all(dir);
        }
        for cgroup in self.cgroups.iter().rev() {
            remove_cgroup_tree(cgroup);
        }
        for v1 in cgroup_v1_mounts() {
            for name in &self.v1_cgroups {
                let path = v1.join(name);
                if path.exists() {
                    remove_cgroup_tree(&path);
                }
            }
        }
        if let Some(before) = &self.stats_before {
            let _ = std::fs::write(STATS_KNOB, before.trim());
        }
        if let Some(tmp) = &self.tmp {
            let _ = std::fs::remove_dir_all(tmp);
        }
    }
}

/// rmdir, deepest first; waits a little for killed processes to leave.
fn remove_cgroup_tree(path: &Path) {
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Err(e) = std::fs::remove_dir(path) {
        if e.kind() == std::io::ErrorKind::NotFound || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Removes the containers, stops dockerd by its pid (SIGKILL after 20 s) and unmounts what it
/// left below its directory.
fn stop_dockerd(mut dockerd: Child, socket: &Path, dir: &Path) {
    let docker = |args: &[&str]| {
        Command::new("/usr/bin/docker")
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            .args(args)
            .stdin(Stdio::null())
            .output()
    };
    if let Ok(out) = docker(&["ps", "-aq"]) {
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(ids.iter().map(String::as_str));
            let _ = docker(&args);
        }
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(dockerd.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while matches!(dockerd.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = dockerd.kill();
    let _ = dockerd.wait();
    let mut mounts: Vec<PathBuf> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(PathBuf::from))
        .filter(|p| p.starts_with(dir))
        .collect();
    mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for m in mounts {
        if let Ok(path) = std::ffi::CString::new(m.display().to_string()) {
            // SAFETY: a NUL-terminated path; a lazy unmount of what the bench's dockerd mounted.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

fn cgroup_v1_mounts() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            let point = mount.split_whitespace().nth(4)?;
            (fs.split_whitespace().next()? == "cgroup").then(|| PathBuf::from(point))
        })
        .collect()
}
