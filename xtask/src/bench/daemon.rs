//! The kad daemon under measure: started on the bench's own socket, state and bpffs pins,
//! asked over its control socket (or with the CLI where a process per call is the point), and
//! its RSS and descriptors read from /proc.
use std::{
    ffi::OsStr,
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
    /// The daemon, with `extra` arguments (part 4: the pod events and the kubelet's layout;
    /// part 5: `--docker SOCKET`). Without Docker (`--no-docker`) unless `extra` asks for it.
    pub(super) fn start_daemon(&mut self, bpffs: &Path, extra: &[&OsStr]) -> Result<()> {
        let state = self.tmp.join("state");
        self.guard.uninstall = Some((self.kad.clone(), bpffs.to_path_buf(), state.clone()));
        let log = File::create(&self.log)?;
        // A Docker at the default socket would be watched otherwise.
        let no_docker = if extra.contains(&OsStr::new("--docker")) {
            None
        } else {
            Some("--no-docker")
        };
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
            .args(no_docker)
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

    /// Stops the daemon and removes what it attached, now rather than at the end.
    pub(super) fn stop_daemon(&mut self) {
        self.guard.stop_daemon();
        self.daemon_pid = 0;
        // Gone with the daemon, unless it was killed: the next daemon binds it again.
        let _ = std::fs::remove_file(&self.socket);
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

    /// The policies' cgroup paths (`kad list`).
    pub(super) fn policy_paths(&self) -> Result<Vec<String>> {
        let reply = self.control(&json!({"cmd": "list"}))?;
        Ok(reply["policies"]
            .as_array()
            .context("kad list: no policies array")?
            .iter()
            .map(|p| p["cgroup"].as_str().unwrap_or("?").to_string())
            .collect())
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

    /// (VmRSS, VmHWM) in kB: now and the peak of the daemon's life.
    pub(super) fn rss_hwm_kb(&self) -> Result<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.daemon_pid))?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .with_context(|| format!("no {name} in the daemon's status"))
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// The daemon's CPU time so far (utime + stime of /proc/PID/stat), in seconds.
    pub(super) fn cpu_s(&self) -> Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.daemon_pid))?;
        // After the command's name in parentheses: state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')').context("daemon's stat")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = fields
            .get(11..13)
            .context("daemon's stat: too few fields")?
            .iter()
            .map(|f| f.parse::<u64>())
            .sum::<Result<u64, _>>()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
        Ok(ticks as f64 / hz as f64)
    }

    /// Time the daemon's threads (those alive now) have waited for a CPU, in seconds: the
    /// second field of /proc/PID/task/*/schedstat.
    pub(super) fn cpu_wait_s(&self) -> Result<f64> {
        let mut ns = 0u64;
        for task in std::fs::read_dir(format!("/proc/{}/task", self.daemon_pid))? {
            let Ok(text) = std::fs::read_to_string(task?.path().join("schedstat")) else {
                continue; // a thread that ended meanwhile
            };
            ns += text
                .split_whitespace()
                .nth(1)
                .and_then(|w| w.parse::<u64>().ok())
                .unwrap_or(0);
        }
        Ok(ns as f64 / 1e9)
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
