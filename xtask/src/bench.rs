//! `cargo xtask bench`: what kad costs per TCP connection, as a ratio measured in one run.
//!
//! The same loopback connect/accept/close loop runs, in turns, in a cgroup without a policy (no
//! kad program runs there) and in one with a policy (both ends get keepalive set). Rounds
//! alternate so that machine noise hits both sides alike; the medians are compared.
use std::{
    fs::File,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

const ROUNDS: usize = 7;
const CONNECTIONS: u32 = 2000;

/// Removes the bench's cgroups, stops its daemon and removes its pins, even on failure.
struct Cleanup {
    cgroups: Vec<PathBuf>,
    daemon: Option<Child>,
    kad: PathBuf,
    dir: PathBuf,
    bpffs: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
            let _ = daemon.wait();
        }
        let _ = Command::new(&self.kad)
            .arg("uninstall")
            .arg("--bpffs")
            .arg(&self.bpffs)
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .arg("--purge")
            .stdout(Stdio::null())
            .status();
        for cgroup in self.cgroups.iter().rev() {
            let _ = std::fs::remove_dir(cgroup);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn run(root: &Path) -> Result<()> {
    let kad = root.join("target/release/kad");
    let peer = root.join("target/release/kad-test-peer");
    let cg_root = cgroup2_root()?;
    let name = format!("kad-bench-{}", std::process::id());
    let top = cg_root.join(&name);
    let (plain, policy) = (top.join("plain"), top.join("policy"));
    let dir = std::env::temp_dir().join(&name);
    let mut cleanup = Cleanup {
        cgroups: vec![top.clone(), plain.clone(), policy.clone()],
        daemon: None,
        kad: kad.clone(),
        bpffs: PathBuf::from("/sys/fs/bpf").join(&name),
        dir: dir.clone(),
    };
    for cgroup in &cleanup.cgroups {
        std::fs::create_dir(cgroup).with_context(|| format!("mkdir {}", cgroup.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("kad.sock");
    cleanup.daemon = Some(
        Command::new(&kad)
            .arg("daemon")
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--bpffs")
            .arg(&cleanup.bpffs)
            .arg("--config")
            .arg(dir.join("none.toml"))
            .stderr(Stdio::null())
            .spawn()
            .context("start kad daemon")?,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        if Instant::now() > deadline {
            bail!("kad daemon did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let set = Command::new(&kad)
        .args([
            "set", "--idle", "180", "--intvl", "60", "--cnt", "20", "--cgroup",
        ])
        .arg(&policy)
        .env("KAD_SOCKET", &socket)
        .output()?;
    if !set.status.success() {
        bail!("kad set: {}", String::from_utf8_lossy(&set.stderr));
    }

    println!("kad bench: {ROUNDS} rounds of {CONNECTIONS} loopback connections (both ends in the cgroup)");
    // The kernel's own accounting of the program's runs; restored afterwards.
    let stats_knob = Path::new("/proc/sys/kernel/bpf_stats_enabled");
    let stats_before = std::fs::read_to_string(stats_knob).unwrap_or_default();
    let _ = std::fs::write(stats_knob, "1");
    // Warm-up, not counted.
    churn(&peer, &plain, CONNECTIONS / 4)?;
    churn(&peer, &policy, CONNECTIONS / 4)?;
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        without.push(churn(&peer, &plain, CONNECTIONS)?);
        with.push(churn(&peer, &policy, CONNECTIONS)?);
    }
    let runs = program_runs(&policy);
    let _ = std::fs::write(stats_knob, stats_before.trim());
    let (a, b) = (median(&mut without), median(&mut with));
    println!("  no policy (no kad program runs): {a:>8} ns per connection (median)");
    println!("  policy (idle/intvl/cnt set):     {b:>8} ns per connection (median)");
    println!(
        "  ratio policy / no policy:        {:>8.3}",
        b as f64 / a as f64
    );
    println!(
        "  cost per connection:             {:>8} ns",
        b as i64 - a as i64
    );
    match runs {
        Some((count, ns)) if count > 0 => {
            let connections = u64::from(CONNECTIONS) * ROUNDS as u64 + u64::from(CONNECTIONS / 4);
            println!(
                "  program runs: {count} ({:.1} per connection), {} ns per run on average",
                count as f64 / connections as f64,
                ns / count
            );
        }
        _ => println!("  program runs: not available (bpftool, kernel.bpf_stats_enabled)"),
    }
    Ok(())
}

/// (run count, total ns) of the kad program attached to `cgroup`, from bpftool.
fn program_runs(cgroup: &Path) -> Option<(u64, u64)> {
    let json = |args: &[&str]| -> Option<String> {
        let out = Command::new("bpftool")
            .args(args)
            .arg("--json")
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let attached = json(&["cgroup", "show", cgroup.to_str()?])?;
    let id = number_after(&attached, "\"id\":")?;
    let prog = json(&["prog", "show", "id", &id.to_string()])?;
    Some((
        number_after(&prog, "\"run_cnt\":")?,
        number_after(&prog, "\"run_time_ns\":")?,
    ))
}

/// The integer after `key` in bpftool's JSON (a scan is enough for two numbers).
fn number_after(text: &str, key: &str) -> Option<u64> {
    let rest = &text[text.find(key)? + key.len()..];
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

fn churn(peer: &Path, cgroup: &Path, count: u32) -> Result<u64> {
    let procs = File::options()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .with_context(|| format!("open {}/cgroup.procs", cgroup.display()))?;
    let fd = procs.as_raw_fd();
    let mut command = Command::new(peer);
    command.args(["churn", &count.to_string()]);
    // SAFETY: only write(2) between fork and exec; "0" moves the writing process.
    unsafe {
        command.pre_exec(move || {
            if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = command.output().context("run kad-test-peer churn")?;
    if !out.status.success() {
        bail!("churn failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("churn output")
}

fn median(values: &mut [u64]) -> u64 {
    values.sort_unstable();
    values[values.len() / 2]
}

fn cgroup2_root() -> Result<PathBuf> {
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
