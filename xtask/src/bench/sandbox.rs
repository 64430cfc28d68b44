//! Where the bench's connections are made: a network namespace of its own and cgroups under
//! the cgroup2 root, entered by each worker before it runs (a pod's worker makes its own
//! network namespace).
use std::{
    fs::File,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use super::Bench;

impl Bench {
    /// A network namespace with loopback up and no TIME_WAIT, removed by the guard.
    pub(super) fn make_netns(&mut self) -> Result<()> {
        crate::run(Command::new("ip").args(["netns", "add", &self.name]))?;
        self.guard.netns = Some(self.name.clone());
        crate::run(Command::new("ip").args(["-n", &self.name, "link", "set", "lo", "up"]))?;
        let path = Path::new("/run/netns").join(&self.name);
        let netns = File::open(&path).with_context(|| format!("open {}", path.display()))?;
        // /proc/sys/net is the namespace of the thread that opens it: a thread of its own.
        std::thread::scope(|s| {
            s.spawn(|| -> Result<()> {
                // SAFETY: setns on a descriptor we hold; it affects only this thread.
                if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!("setns: {}", std::io::Error::last_os_error());
                }
                std::fs::write("/proc/sys/net/ipv4/tcp_max_tw_buckets", "0")
                    .context("tcp_max_tw_buckets in the bench's network namespace")
            })
            .join()
            .unwrap_or_else(|_| bail!("netns thread panicked"))
        })?;
        self.netns = Some(netns);
        Ok(())
    }

    /// A uniquely named child of the cgroup2 root, removed by the guard.
    pub(super) fn top_cgroup(&mut self, what: &str) -> Result<PathBuf> {
        let path = self.cg_root.join(format!("{}-{what}", self.name));
        mkdir(&path)?;
        self.guard.cgroups.push(path.clone());
        Ok(path)
    }

    /// This binary's bench worker, started inside `cgroup` and the bench's network namespace.
    pub(super) fn in_cgroup(&self, cgroup: &Path, args: &[&str]) -> Result<Command> {
        let netns = self
            .netns
            .as_ref()
            .context("no network namespace")?
            .try_clone()?;
        self.worker_in(cgroup, Some(netns), args)
    }

    /// This binary's bench worker, started inside a pod's `cgroup`; it makes its own network
    /// namespace (`pod` and `first`).
    pub(super) fn in_pod(&self, cgroup: &Path, args: &[&str]) -> Result<Command> {
        self.worker_in(cgroup, None, args)
    }

    fn worker_in(&self, cgroup: &Path, netns: Option<File>, args: &[&str]) -> Result<Command> {
        let procs = File::options()
            .write(true)
            .open(cgroup.join("cgroup.procs"))
            .with_context(|| format!("open {}/cgroup.procs", cgroup.display()))?;
        let mut command = Command::new(&self.worker);
        command.arg("bench-worker").args(args);
        // SAFETY: only setns(2) and write(2) between fork and exec; "0" moves the writing
        // process. The descriptors live in the closure until the command is dropped.
        unsafe {
            command.pre_exec(move || {
                if let Some(netns) = &netns {
                    if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(command)
    }
}

pub(super) fn mkdir(path: &Path) -> Result<()> {
    std::fs::create_dir(path).with_context(|| format!("mkdir {}", path.display()))
}

pub(super) fn cgroup2_root() -> Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    mountinfo
        .lines()
        .find_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            if fs.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            mount.split_whitespace().nth(4).map(PathBuf::from)
        })
        .context("no cgroup2 filesystem mounted")
}
