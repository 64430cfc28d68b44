//! The kad daemon under measure: started on the bench's own socket, state and bpffs pins,
//! asked over its control socket (or with the CLI where a process per call is the point), and
//! its RSS and descriptors read from /proc.
use std::{
    fs::File,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

use super::{guard::check_interrupted, Bench};

impl Bench {
    /// The daemon, without Docker unless `extra` says `--docker SOCKET`.
    pub(super) fn start_daemon(&mut self, bpffs: &Path, extra: &[&str]) -> Result<()> {
        let state = self.tmp.join("state");
        self.guard.uninstall = Some((self.kad.clone(), bpffs.to_path_buf(), state.clone()));
        let log = File::create(&self.log)?;
        let daemon = Command::new(&self.kad)
            .arg("daemon")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&state)
            .arg("--bpffs")
            .arg(bpffs)
            .arg("--config")
            .arg(self.tmp.join("none.toml"))
            .arg("--no-docker")
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {} daemon", self.kad.display()))?;
        self.daemon_pid = daemon.id();
        self.guard.daemon = Some(daemon);
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(&self.socket).is_err() {
            check_interrupted()?;
            if let Some(Ok(Some(status))) = self.guard.daemon.as_mut().map(Child::try_wait) {
                bail!(
                    "kad daemon exited ({status}): {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!("kad daemon did not open {}", self.socket.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Stops the daemon (SIGTERM) and starts it again on the same paths, with `extra`.
    pub(super) fn restart_daemon(&mut self, extra: &[&str]) -> Result<()> {
        let bpffs = match &self.guard.uninstall {
            Some((_, bpffs, _)) => bpffs.clone(),
            None => bail!("no daemon to restart"),
        };
        if let Some(mut daemon) = self.guard.daemon.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(daemon.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
        self.start_daemon(&bpffs, extra)
    }

    /// One request over the control socket (what `kad` does, without a process per call).
    pub(super) fn control(&self, request: &Value) -> Result<Value> {
        let mut stream = UnixStream::connect(&self.socket)
            .with_context(|| format!("connect {}", self.socket.display()))?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        writeln!(stream, "{request}")?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line)?;
        let reply: Value =
            serde_json::from_str(&line).with_context(|| format!("daemon reply {line:?}"))?;
        if reply["reply"] == "error" {
            bail!("kad daemon refused {request}: {}", reply["message"]);
        }
        Ok(reply)
    }

    pub(super) fn set(&self, cgroup: &Path, (idle, intvl, cnt): (u32, u32, u32)) -> Result<()> {
        self.control(&json!({
            "cmd": "set",
            "cgroup": cgroup,
            "policy": {"mode": "on", "idle": idle, "intvl": intvl, "cnt": cnt},
        }))?;
        Ok(())
    }

    pub(super) fn kad_set_cli(
        &self,
        cgroup: &Path,
        (idle, intvl, cnt): (u32, u32, u32),
    ) -> Result<()> {
        let out = Command::new(&self.kad)
            .arg("set")
            .arg("--cgroup")
            .arg(cgroup)
            .args(["--idle", &idle.to_string()])
            .args(["--intvl", &intvl.to_string()])
            .args(["--cnt", &cnt.to_string()])
            .env("KAD_SOCKET", &self.socket)
            .output()
            .context("run kad set")?;
        if !out.status.success() {
            bail!("kad set: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    /// A policy cgroup's counters (`kad stats`).
    pub(super) fn counters(&self, cgroup: &Path) -> Result<Value> {
        let reply = self.control(&json!({"cmd": "stats"}))?;
        let wanted = cgroup.to_string_lossy();
        reply["stats"]
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["cgroup"] == *wanted))
            .cloned()
            .with_context(|| format!("kad stats has no row for {wanted}"))
    }

    pub(super) fn policy_count(&self) -> Result<usize> {
        let reply = self.control(&json!({"cmd": "list"}))?;
        reply["policies"]
            .as_array()
            .map(Vec::len)
            .context("kad list: no policies array")
    }

    pub(super) fn rss_kb(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.daemon_pid))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .context("no VmRSS in the daemon's status")
    }

    pub(super) fn fds(&self) -> Result<usize> {
        Ok(std::fs::read_dir(format!("/proc/{}/fd", self.daemon_pid))?.count())
    }

    /// After a failure: whether the daemon is still there, and the end of its log.
    pub(super) fn report_daemon(&mut self) {
        if let Some(Ok(Some(status))) = self.guard.daemon.as_mut().map(Child::try_wait) {
            eprintln!("kad daemon exited: {status}");
        }
        if let Ok(log) = std::fs::read_to_string(&self.log) {
            let lines: Vec<&str> = log.lines().collect();
            eprintln!("last lines of the daemon's log:");
            for line in &lines[lines.len().saturating_sub(15)..] {
                eprintln!("  {line}");
            }
        }
    }
}
