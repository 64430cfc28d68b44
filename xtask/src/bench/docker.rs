//! Part 4, Docker: 100 labelled containers started one after the other with `docker run`
//! (create, then start at once: the race kad must win), each one's first connection checked
//! (both ends, with ss in its network namespace), and the time from Docker's `create` event to
//! the policy in kad's table (so in the kernel: the table is published after the map write).
//!
//! A dockerd of the bench's own (Debian's docker.io) with its own paths, no networking of its
//! own and the cgroupfs driver, in a bench cgroup; containers with `--network none` and a bench
//! cgroup as `--cgroup-parent`. The guard removes the containers, stops dockerd and removes its
//! mounts, directories and cgroups.
use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::{json, Value};

use super::{goal, guard::check_interrupted, Bench};

const CONTAINERS: usize = 100;
const DOCKER: &str = "/usr/bin/docker";
const DOCKERD: &str = "/usr/sbin/dockerd";
const IMAGE: &str = "kad-bench-busybox:1";
const LABEL: &str = "kad.dev/keepalive=idle=151,intvl=15,cnt=3";
const FIRST_CONNECTION: &str = "sleep 1000 | nc -l -p 5000 & \
     sleep 0.2; until sleep 1000 | nc 127.0.0.1 5000; do sleep 0.05; done";
/// How often kad's table is read while containers start.
const POLL: Duration = Duration::from_millis(2);

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}

/// What was seen, by container id or cgroup path, in epoch nanoseconds.
#[derive(Default)]
struct Seen {
    create: HashMap<String, u128>,
    start: HashMap<String, u128>,
    /// Paths in kad's list, first seen.
    listed: HashMap<String, u128>,
}

impl Bench {
    pub(super) fn docker(&mut self) -> Result<()> {
        ensure!(
            Path::new(DOCKERD).is_file() && Path::new(DOCKER).is_file(),
            "dockerd is missing (cargo xtask setup installs docker.io)"
        );
        let dir = self.tmp.join("dockerd");
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("docker.sock");
        let own = self.top_cgroup("dockerd")?;
        let parent = self.top_cgroup("docker-ctrs")?;
        let parent_name = parent
            .file_name()
            .context("parent name")?
            .to_string_lossy()
            .to_string();
        self.guard.v1_cgroups.push(parent_name.clone());
        let log = std::fs::File::create(dir.join("dockerd.log"))?;
        let procs = std::fs::File::options()
            .write(true)
            .open(own.join("cgroup.procs"))?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&procs);
        let mut command = Command::new(DOCKERD);
        command
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            .arg("--pidfile")
            .arg(dir.join("docker.pid"))
            .args([
                "--iptables=false",
                "--bridge=none",
                "--ip-forward=false",
                "--ip-masq=false",
                "--exec-opt",
                "native.cgroupdriver=cgroupfs",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: only write(2) runs between fork and exec.
        unsafe {
            command.pre_exec(move || {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().context("start dockerd")?;
        drop(procs);
        self.guard.dockerd = Some((child, socket.clone(), dir.clone()));
        let docker = |args: &[&str]| -> Result<String> {
            let out = Command::new(DOCKER)
                .arg("-H")
                .arg(format!("unix://{}", socket.display()))
                .args(args)
                .stdin(Stdio::null())
                .output()
                .context("run docker")?;
            if !out.status.success() {
                bail!(
                    "docker {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while docker(&["version"]).is_err() {
            check_interrupted()?;
            ensure!(Instant::now() < deadline, "dockerd did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        import_busybox(&dir, &docker)?;

        // kad again, now watching this dockerd (the policies and pins stay).
        self.restart_daemon(&["--docker", &socket.display().to_string()])?;
        let connected = Instant::now() + Duration::from_secs(30);
        loop {
            let status = self.control(&json!({"cmd": "status"}))?;
            if status["docker"]["connected"] == true {
                break;
            }
            ensure!(Instant::now() < connected, "kad did not connect to dockerd");
            std::thread::sleep(Duration::from_millis(50));
        }
        println!(
            "4. Docker: {CONTAINERS} containers with the label started one after the other \
             (`docker run`: created, then started at once), each one's first connection checked"
        );

        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        // Docker's events, with its timestamps.
        let mut events = Command::new(DOCKER)
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            .args([
                "events",
                "--format",
                "{{json .}}",
                "--filter",
                "type=container",
                "--filter",
                "event=create",
                "--filter",
                "event=start",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("docker events")?;
        let stdout = events.stdout.take().context("events stdout")?;
        self.guard.children.push(events);
        let reader = {
            let seen = Arc::clone(&seen);
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let Ok(event) = serde_json::from_str::<Value>(&line) else {
                        continue;
                    };
                    let (Some(id), Some(t)) = (event["id"].as_str(), event["timeNano"].as_u64())
                    else {
                        continue;
                    };
                    let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                    match event["Action"].as_str() {
                        Some("create") => seen.create.insert(id.to_string(), t as u128),
                        Some("start") => seen.start.insert(id.to_string(), t as u128),
                        _ => None,
                    };
                }
            })
        };
        // kad's table, polled.
        let poller = {
            let seen = Arc::clone(&seen);
            let stop = Arc::clone(&stop);
            let socket = self.socket.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(reply) = control_at(&socket, &json!({"cmd": "list"})) {
                        let t = now_ns();
                        let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                        for p in reply["policies"].as_array().into_iter().flatten() {
                            if let Some(path) = p["cgroup"].as_str() {
                                seen.listed.entry(path.to_string()).or_insert(t);
                            }
                        }
                    }
                    std::thread::sleep(POLL);
                }
            })
        };

        let parent_arg = format!("/{parent_name}");
        let mut covered = 0;
        let mut ids = Vec::new();
        let started = Instant::now();
        for _ in 0..CONTAINERS {
            check_interrupted()?;
            let id = docker(&[
                "run",
                "-d",
                "--network",
                "none",
                "--cgroup-parent",
                &parent_arg,
                "--label",
                LABEL,
                IMAGE,
                "/bin/sh",
                "-c",
                FIRST_CONNECTION,
            ])?;
            let pid: u32 = docker(&["inspect", "--format", "{{.State.Pid}}", &id])?
                .parse()
                .context("container pid")?;
            if first_connection_covered(pid) {
                covered += 1;
            }
            // Stopped at once: 100 running containers are not the point.
            docker(&["kill", &id])?;
            ids.push(id);
        }
        let elapsed = started.elapsed();
        stop.store(true, Ordering::Relaxed);
        let _ = poller.join();
        // The start events of the last containers may still be on their way.
        std::thread::sleep(Duration::from_millis(200));
        let seen = Arc::try_unwrap(seen)
            .ok()
            .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
            .unwrap_or_default();
        let mut to_policy = Vec::new();
        let mut before_start = Vec::new();
        for id in &ids {
            let path = parent.join(id).display().to_string();
            if let (Some(c), Some(l)) = (seen.create.get(id), seen.listed.get(&path)) {
                to_policy.push(l.saturating_sub(*c) as f64 / 1e6);
                if let Some(s) = seen.start.get(id) {
                    before_start.push((*s as f64 - *l as f64) / 1e6);
                }
            }
        }
        to_policy.sort_by(f64::total_cmp);
        before_start.sort_by(f64::total_cmp);
        let pct = |v: &[f64], p: f64| v.get(((v.len() as f64 - 1.0) * p) as usize).copied();
        println!(
            "   {CONTAINERS} containers in {:.1} s; create → policy in kad's table (read every \
             {} ms): median {:.1} ms, p95 {:.1} ms, max {:.1} ms ({} measured)",
            elapsed.as_secs_f64(),
            POLL.as_millis(),
            pct(&to_policy, 0.5).unwrap_or(f64::NAN),
            pct(&to_policy, 0.95).unwrap_or(f64::NAN),
            pct(&to_policy, 1.0).unwrap_or(f64::NAN),
            to_policy.len()
        );
        println!(
            "   policy listed before Docker's start event by: min {:.1} ms, median {:.1} ms",
            pct(&before_start, 0.0).unwrap_or(f64::NAN),
            pct(&before_start, 0.5).unwrap_or(f64::NAN),
        );
        goal(
            "first connections with the policy, both ends (of 100)",
            covered as f64,
            "100",
            covered == CONTAINERS,
        );
        let max = pct(&to_policy, 1.0).unwrap_or(f64::INFINITY);
        goal(
            "create → policy in force, max ms",
            max,
            "< 35 ms, the shortest create → cgroup gap measured",
            max < 35.0 && to_policy.len() == CONTAINERS,
        );
        for id in &ids {
            let _ = docker(&["rm", "-f", id]);
        }
        drop(reader);
        Ok(())
    }
}

/// A busybox-static rootfs, imported as the bench's image.
fn import_busybox(dir: &Path, docker: &dyn Fn(&[&str]) -> Result<String>) -> Result<()> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .context("busybox-static is missing")?;
    let bin = dir.join("rootfs/bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::copy(&busybox, bin.join("busybox"))?;
    let list = Command::new(&busybox).arg("--list").output()?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && !applet.contains('/') {
            std::os::unix::fs::symlink("busybox", bin.join(applet))?;
        }
    }
    let tar = dir.join("rootfs.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(dir.join("rootfs"))
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()?;
    ensure!(status.success(), "tar of the rootfs failed");
    docker(&["import", &tar.display().to_string(), IMAGE])?;
    Ok(())
}

/// Both ends of the container's first connection have a keepalive timer armed with idle=151
/// (ss in its network namespace), within 10 s.
fn first_connection_covered(pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = Command::new("nsenter")
            .args([
                "-t",
                &pid.to_string(),
                "-n",
                "ss",
                "-tnoH",
                "state",
                "established",
            ])
            .output();
        let text = out
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| l.contains(":5000")).collect();
        if lines.len() == 2 {
            // The policy's 151 s, not the kernel's 7200 s.
            return lines
                .iter()
                .all(|l| keepalive_secs(l).is_some_and(|left| left > 0.0 && left <= 151.0));
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One request to a kad control socket, from another thread than the bench's.
fn control_at(socket: &Path, request: &Value) -> Result<Value> {
    use std::io::Write as _;
    let mut stream = std::os::unix::net::UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    writeln!(stream, "{request}")?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    Ok(serde_json::from_str(&line)?)
}

/// Seconds left on a keepalive timer in an `ss -o` line, e.g. `timer:(keepalive,2min30sec,0)`.
fn keepalive_secs(line: &str) -> Option<f64> {
    let timer = line.split("timer:(keepalive,").nth(1)?.split(',').next()?;
    let mut secs = 0.0;
    let mut number = String::new();
    let mut rest = timer;
    while let Some(c) = rest.chars().next() {
        if c.is_ascii_digit() || c == '.' {
            number.push(c);
            rest = &rest[1..];
            continue;
        }
        let value: f64 = number.parse().ok()?;
        number.clear();
        let (unit, factor) = [("min", 60.0), ("sec", 1.0), ("ms", 0.001), ("h", 3600.0)]
            .into_iter()
            .find(|(u, _)| rest.starts_with(u))?;
        secs += value * factor;
        rest = &rest[unit.len()..];
    }
    Some(secs)
}
