//! Part 6 (`--control-only` runs it alone): what one unprivileged user can cost root on the
//! control socket. Root's `kad set` (a CLI process per call, as a user runs it) is timed with
//! the daemon idle, then while another user floods the socket: 100 MB request lines on 32
//! connections; connections opened and closed as fast as 5 users can; 20 connections asking
//! for `status` in a loop at 10,000 policies. The daemon's CPU and peak RSS during each flood
//! are read from /proc. Also `kad set` on a path that does not exist yet (a waiting policy),
//! idle, with the CLI and over the socket.
use std::{
    io::{Read as _, Write as _},
    os::unix::{net::UnixStream, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::{goal, guard::check_interrupted, measure::ms, sandbox::mkdir, Bench};

/// Waiting policies in the daemon's config: a status of about 3 MB.
const POLICIES: usize = 10_000;
/// Root's `kad set` runs timed per condition, and the pause between them.
const SETS: usize = 200;
const PAUSE: Duration = Duration::from_millis(10);
/// The flooding users (`nobody` and the uids below it).
const FLOOD_UID: u32 = 65534;

/// The floods, as `xtask bench-worker flood KIND SOCKET THREADS` runs them.
const FLOODS: [(&str, &str, usize, u32); 3] = [
    ("100 MB request lines, 32 connections", "oversized", 32, 1),
    ("reconnects from 5 users", "reconnect", 8, 5),
    ("status at 10,000 policies, 20 readers", "status", 20, 1),
];

impl Bench {
    pub(super) fn control_socket(&mut self, bpffs: &Path) -> Result<()> {
        println!("6. Root's `kad set` while another user floods the control socket");
        let top = self.top_cgroup("control")?;
        let svc = top.join("svc");
        mkdir(&svc)?;
        let mut config = String::new();
        for i in 0..POLICIES {
            config += &format!(
                "[[policy]]\ncgroup = \"{}\"\nidle = 100\n",
                top.join(format!("waiting/w{i:05}")).display()
            );
        }
        std::fs::write(self.tmp.join("none.toml"), config).context("write the config")?;
        self.start_daemon(bpffs, &[])?;
        // The clients of other users reach the socket through the bench's directory.
        std::fs::set_permissions(
            &self.tmp,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )?;
        // Warm up (the first CLI runs page the binary in).
        for i in 0..10 {
            self.kad_set_cli(&svc, (300 + i, 60, 5))?;
        }
        // Over the socket (no process per call): an existing cgroup, then new paths that do
        // not exist yet (each a new waiting policy).
        let socket_sets =
            |bench: &Bench, path: &dyn Fn(usize) -> PathBuf| -> Result<Vec<Duration>> {
                let mut times = Vec::with_capacity(SETS);
                for i in 0..SETS {
                    let start = Instant::now();
                    bench.set(&path(i), (100 + i as u32, 60, 5))?;
                    times.push(start.elapsed());
                    std::thread::sleep(PAUSE);
                }
                Ok(times)
            };
        let existing = socket_sets(self, &|_| svc.clone())?;
        let new_waiting = socket_sets(self, &|i| top.join(format!("new/n{i:03}")))?;
        println!(
            "   over the socket, median: set on an existing cgroup {:.2} ms, on a new waiting \
             path {:.2} ms",
            ms(percentile(&existing, 50)),
            ms(percentile(&new_waiting, 50))
        );
        let idle = self.time_sets(&svc)?;
        let waiting = self.time_sets(&top.join("not-yet"))?;
        let (idle50, idle99) = (percentile(&idle, 50), percentile(&idle, 99));
        println!(
            "   idle: root's kad set p50 {:.2} ms, p99 {:.2} ms; on a waiting path p50 {:.2} ms, \
             p99 {:.2} ms",
            ms(idle50),
            ms(idle99),
            ms(percentile(&waiting, 50)),
            ms(percentile(&waiting, 99))
        );
        for (label, kind, threads, users) in FLOODS {
            check_interrupted()?;
            let mut flooders = Vec::new();
            for u in 0..users {
                let uid = FLOOD_UID - u;
                let child = Command::new(&self.worker)
                    .args(["bench-worker", "flood", kind])
                    .arg(&self.socket)
                    .arg(threads.to_string())
                    .uid(uid)
                    .gid(uid)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .spawn()
                    .context("start a flooding worker")?;
                flooders.push(child.id());
                self.guard.children.push(child);
            }
            std::thread::sleep(Duration::from_secs(1));
            let (cpu0, at) = (self.cpu_s()?, Instant::now());
            let rss0 = self.rss_kb()?;
            let mut peak = rss0;
            let times = self.time_sets_watching(&svc, &mut peak)?;
            let cpu = (self.cpu_s()? - cpu0) / at.elapsed().as_secs_f64();
            for child in &mut self.guard.children {
                if flooders.contains(&child.id()) {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
            self.guard.children.retain(|c| !flooders.contains(&c.id()));
            let (p50, p99) = (percentile(&times, 50), percentile(&times, 99));
            println!(
                "   {label}: p50 {:.2} ms, p99 {:.2} ms; daemon {:.0}% of a core, RSS {} -> \
                 peak {} kB",
                ms(p50),
                ms(p99),
                cpu * 100.0,
                rss0,
                peak
            );
            let ratio = ms(p99) / ms(idle99);
            goal(
                &format!("root's p99 under {kind} / idle"),
                ratio,
                "<= 2",
                ratio <= 2.0,
            );
            std::thread::sleep(Duration::from_secs(2));
        }
        Ok(())
    }

    fn time_sets(&self, cgroup: &Path) -> Result<Vec<Duration>> {
        let mut peak = 0;
        self.time_sets_watching(cgroup, &mut peak)
    }

    /// `SETS` timed `kad set` runs on `cgroup`, each with values of its own; `peak` follows
    /// the daemon's RSS.
    fn time_sets_watching(&self, cgroup: &Path, peak: &mut u64) -> Result<Vec<Duration>> {
        let mut times = Vec::with_capacity(SETS);
        for i in 0..SETS {
            check_interrupted()?;
            let start = Instant::now();
            self.kad_set_cli(cgroup, (100 + i as u32, 60, 5))?;
            times.push(start.elapsed());
            *peak = (*peak).max(self.rss_kb()?);
            std::thread::sleep(PAUSE);
        }
        Ok(times)
    }
}

fn percentile(times: &[Duration], p: usize) -> Duration {
    let mut sorted = times.to_vec();
    sorted.sort();
    sorted[((sorted.len() * p) / 100).min(sorted.len() - 1)]
}

/// `xtask bench-worker flood KIND SOCKET THREADS`: floods the control socket until killed.
pub fn flood(kind: &str, socket: &str, threads: usize) -> Result<()> {
    let socket = PathBuf::from(socket);
    let work: fn(&Path) = match kind {
        "oversized" => oversized,
        "reconnect" => reconnect,
        "status" => status,
        _ => bail!("unknown flood {kind}"),
    };
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let socket = socket.clone();
            std::thread::spawn(move || loop {
                work(&socket)
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

/// One 100 MB request line, written until the daemon closes; then its reply.
fn oversized(socket: &Path) {
    let Ok(mut stream) = UnixStream::connect(socket) else {
        return;
    };
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..100 {
        if stream.write_all(&chunk).is_err() {
            break;
        }
    }
    let _ = stream.read_to_end(&mut Vec::new());
}

fn reconnect(socket: &Path) {
    let _ = UnixStream::connect(socket);
}

fn status(socket: &Path) {
    let Ok(mut stream) = UnixStream::connect(socket) else {
        return;
    };
    if stream.write_all(b"{\"cmd\":\"status\"}\n").is_ok() {
        let _ = stream.read_to_end(&mut Vec::new());
    }
}
