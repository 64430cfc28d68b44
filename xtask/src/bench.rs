//! `cargo xtask bench`: what kad costs, measured in one run against hand-written programs.
//!
//! 1. Cost at the floor. The same loopback connect/accept/close loop (both ends in the
//!    measured cgroup) runs in alternating rounds in three cgroups: one with an EMPTY C
//!    sock_ops program, one with a hand-written C ANCHOR program that sets the four keepalive
//!    options, one with a kad policy. The kernel's BPF stats give every program's run time;
//!    summed over the programs of a set-up and divided by the sockets (two per connection),
//!    that is its cost per socket.
//! 2. Scale. The same with 10,000 policies, and for a socket 8 cgroups below its policy; the
//!    daemon's RSS and descriptors, and how long `kad set` takes.
//! 3. Existing connections. 100,000 established loopback connections, then `kad set` on
//!    their cgroup, timed, and every socket checked with getsockopt (a sample with ss).
//!
//! The connections are made in a network namespace of the bench's own, where TIME_WAIT is
//! switched off (`tcp_max_tw_buckets` 0): hundreds of thousands of connections leave nothing
//! behind, take no ports from the host, and close without an error (no error-path program
//! runs). The goals are reported, not asserted: the bench fails only when it cannot measure.
//! Everything it creates (cgroups under the cgroup2 root, the network namespace, pins,
//! processes, the daemon) is removed by a guard, also on failure.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs::File,
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    os::{
        fd::AsRawFd,
        unix::{net::UnixStream, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::{json, Value};

/// Rounds per set-up; each round is a fresh process making `CONNECTIONS` connections. A
/// multiple of 3 and 4, so that every set-up runs as often in every position of a round.
const ROUNDS: usize = 24;
const CONNECTIONS: u64 = 5000;
const SCALE_POLICIES: usize = 10_000;
const DEPTH: usize = 8;
/// `kad set` runs of the CLI (a process each) timed at 10,000 policies.
const CLI_SETS: usize = 21;
const EXISTING: usize = 100_000;
/// Clients looping `set` while `list` is timed, and how many `list`s are timed.
const WRITERS: usize = 20;
const LIST_SAMPLES: usize = 200;

/// The policy kad and the anchor program apply in parts 1 and 2.
const IDLE: u32 = 180;
const INTVL: u32 = 60;
const CNT: u32 = 20;
/// Part 3's values differ, so a socket that has them got them from that `kad set`.
const EXISTING_POLICY: (u32, u32, u32) = (190, 70, 7);

const EMPTY_C: &str = r#"#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("sockops")
int bench_empty(struct bpf_sock_ops *skops)
{
	return 1;
}

char LICENSE[] SEC("license") = "GPL";
"#;

/// What kad does for a socket, by hand: the four options at ACTIVE/PASSIVE_ESTABLISHED.
const ANCHOR_C: &str = r#"#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define SOL_SOCKET 1
#define SO_KEEPALIVE 9
#define IPPROTO_TCP 6
#define TCP_KEEPIDLE 4
#define TCP_KEEPINTVL 5
#define TCP_KEEPCNT 6

SEC("sockops")
int bench_anchor(struct bpf_sock_ops *skops)
{
	int one = 1, idle = IDLE, intvl = INTVL, cnt = CNT;

	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		bpf_setsockopt(skops, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
		bpf_setsockopt(skops, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
		bpf_setsockopt(skops, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof(intvl));
		bpf_setsockopt(skops, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof(cnt));
		break;
	}
	return 1;
}

char LICENSE[] SEC("license") = "GPL";
"#;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// ^C or SIGTERM: stop at the next check, so the guard cleans up.
fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The guard: everything the bench made, undone in reverse, whatever happened.

#[derive(Default)]
struct Guard {
    /// Cgroups made by the bench, children of the cgroup2 root (removed with what is below).
    cgroups: Vec<PathBuf>,
    /// C programs attached with bpftool: (cgroup, pin).
    attached: Vec<(PathBuf, PathBuf)>,
    bpffs: Option<PathBuf>,
    tmp: Option<PathBuf>,
    daemon: Option<Child>,
    /// (kad binary, --bpffs, --state-dir) for `kad uninstall`.
    uninstall: Option<(PathBuf, PathBuf, PathBuf)>,
    children: Vec<Child>,
    /// The network namespace the connections are made in (`ip netns`).
    netns: Option<String>,
    stats_before: Option<String>,
}

const STATS_KNOB: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl Drop for Guard {
    fn drop(&mut self) {
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

// ---------------------------------------------------------------------------------------------
// The run.

struct Bench {
    guard: Guard,
    kad: PathBuf,
    worker: PathBuf,
    cg_root: PathBuf,
    name: String,
    tmp: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    daemon_pid: u32,
    /// The bench's network namespace, entered by every worker.
    netns: Option<File>,
}

/// One measured set-up: where the loop runs and which programs are its cost.
struct Setup {
    label: String,
    cgroup: PathBuf,
    programs: Vec<u64>,
    /// Whether the loop's sockets must come out with keepalive on.
    keepalive: bool,
}

#[derive(Default, Clone, Copy)]
struct ProgStat {
    runs: u64,
    ns: u64,
}

struct Round {
    conn_ns: u64,
    per_prog: HashMap<u64, ProgStat>,
}

struct Summary {
    /// Per round: wall time per connection, and the programs' run time per socket.
    conn_rounds: Vec<f64>,
    sock_rounds: Vec<f64>,
    /// Median wall time per connection of the loop.
    conn_ns: f64,
    /// Median over rounds of the programs' run time per socket.
    sock_ns: f64,
    runs_per_socket: f64,
    /// Per program, over all rounds: (runs, ns) per socket.
    per_prog: HashMap<u64, (f64, f64)>,
}

pub fn run(root: &Path, floor_only: bool) -> Result<()> {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
    let cg_root = cgroup2_root()?;
    let name = format!("kad-bench-{}", std::process::id());
    let tmp = std::env::temp_dir().join(&name);
    let mut bench = Bench {
        guard: Guard::default(),
        kad: root.join("target/release/kad"),
        worker: std::env::current_exe().context("the xtask binary")?,
        cg_root,
        socket: tmp.join("kad.sock"),
        log: tmp.join("daemon.log"),
        tmp,
        name,
        daemon_pid: 0,
        netns: None,
    };
    let result = bench.run(floor_only);
    if result.is_err() {
        bench.report_daemon();
    }
    result
}

impl Bench {
    fn run(&mut self, floor_only: bool) -> Result<()> {
        std::fs::create_dir_all(&self.tmp)
            .with_context(|| format!("mkdir {}", self.tmp.display()))?;
        self.guard.tmp = Some(self.tmp.clone());
        let bpffs = Path::new("/sys/fs/bpf").join(&self.name);
        std::fs::create_dir(&bpffs).with_context(|| format!("mkdir {}", bpffs.display()))?;
        self.guard.bpffs = Some(bpffs.clone());
        self.make_netns()?;

        let empty_cg = self.top_cgroup("empty")?;
        let anchor_cg = self.top_cgroup("anchor")?;
        let kad_cg = self.top_cgroup("kad")?;
        let empty = self.load_c("empty", EMPTY_C, &bpffs, &empty_cg)?;
        let anchor = self.load_c("anchor", ANCHOR_C, &bpffs, &anchor_cg)?;
        self.start_daemon(&bpffs.join("kad"))?;
        self.set(&kad_cg, (IDLE, INTVL, CNT))?;
        let kad_progs = kad_programs(&bpffs.join("kad"))?;
        let kad_ids: Vec<u64> = kad_progs.keys().copied().collect();

        // The kernel's accounting of program runs, for this run only.
        let before = std::fs::read_to_string(STATS_KNOB).context(STATS_KNOB)?;
        std::fs::write(STATS_KNOB, "1").context("enable kernel.bpf_stats_enabled")?;
        self.guard.stats_before = Some(before);

        println!(
            "kad bench: kernel {}, {} CPUs; {ROUNDS} alternating rounds of {CONNECTIONS} loopback \
             connections per set-up, both ends in the cgroup",
            kernel_release(),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        println!();
        println!("1. Cost per socket (kernel BPF stats) and connection rate");
        let setups = vec![
            Setup {
                label: "empty (C, returns 1)".into(),
                cgroup: empty_cg.clone(),
                programs: vec![empty],
                keepalive: false,
            },
            Setup {
                label: "anchor (C, 4 setsockopt)".into(),
                cgroup: anchor_cg,
                programs: vec![anchor],
                keepalive: true,
            },
            Setup {
                label: "kad (1 policy)".into(),
                cgroup: kad_cg.clone(),
                programs: kad_ids.clone(),
                keepalive: true,
            },
        ];
        let part1 = self.measure(&setups)?;
        print_table(&setups, &part1);
        let (e, a, k) = (&part1[0], &part1[1], &part1[2]);
        println!("   kad's programs, per socket:");
        print_programs(&kad_progs, k);
        let configured = self.counters(&kad_cg)?;
        // The rounds, the warm-up, and one probe connection before each.
        let made = (CONNECTIONS + 1) * ROUNDS as u64 + CONNECTIONS / 5 + 1;
        println!(
            "   kad counted {} connect + {} accept sides configured for {made} connections",
            configured["connect"], configured["accept"]
        );
        // Ratios within each round (the set-ups ran back to back), then their median: the
        // machine's load drifts between rounds more than within one.
        let cost_ratio = paired(&k.sock_rounds, &a.sock_rounds);
        let rate_ratio = paired(&e.conn_rounds, &k.conn_rounds);
        goal(
            "per-socket cost kad / anchor",
            cost_ratio,
            "<= 1.0",
            cost_ratio <= 1.0,
        );
        goal(
            "connection rate kad / empty",
            rate_ratio,
            ">= 0.97",
            rate_ratio >= 0.97,
        );
        // What keepalive itself costs a connection (timers armed and removed), whoever sets it.
        println!(
            "   (connection rate anchor / empty: {:.3}; kad / anchor: {:.3})",
            paired(&e.conn_rounds, &a.conn_rounds),
            paired(&a.conn_rounds, &k.conn_rounds)
        );
        let (rss1, fds1) = (self.rss_kb()?, self.fds()?);
        if floor_only {
            return Ok(());
        }

        println!();
        println!("2. Scale: {SCALE_POLICIES} policies on children of one cgroup");
        let scale = self.top_cgroup("scale")?;
        for i in 0..SCALE_POLICIES {
            mkdir(&scale.join(format!("p{i:05}")))?;
        }
        let mut deep = scale.clone();
        for level in 1..=DEPTH {
            deep = deep.join(format!("n{level}"));
            mkdir(&deep)?;
        }
        // A neighbour without a policy: below kad's anchor (the policies' parent), so kad's
        // programs run for its sockets too.
        let neighbour = scale.join("none");
        mkdir(&neighbour)?;
        // Made now, before any policy below `scale` makes the daemon watch it: a mkdir while
        // `kad set` is timed would time the daemon's handling of the mkdir too.
        let cli_paths: Vec<PathBuf> = (0..CLI_SETS)
            .map(|i| scale.join(format!("cli{i:02}")))
            .collect();
        for path in &cli_paths {
            mkdir(path)?;
        }
        let mut latencies = Vec::with_capacity(SCALE_POLICIES);
        for i in 0..SCALE_POLICIES {
            check_interrupted()?;
            let start = Instant::now();
            self.set(&scale.join(format!("p{i:05}")), (IDLE, INTVL, CNT))?;
            latencies.push(start.elapsed());
        }
        // The policy 7 cgroups above the measured one: the ancestor walk's worst case here.
        self.set(&scale.join("n1"), (IDLE, INTVL, CNT))?;
        let mut cli = Vec::with_capacity(CLI_SETS);
        for path in &cli_paths {
            let start = Instant::now();
            self.kad_set_cli(path, (IDLE, INTVL, CNT))?;
            cli.push(start.elapsed());
        }
        let policies = self.policy_count()?;
        let (rss, fds) = (self.rss_kb()?, self.fds()?);
        let setups2 = vec![
            Setup {
                label: "empty (C, returns 1)".into(),
                cgroup: empty_cg,
                programs: vec![empty],
                keepalive: false,
            },
            Setup {
                label: format!("kad, {policies} policies"),
                cgroup: scale.join(format!("p{:05}", SCALE_POLICIES / 2)),
                programs: kad_ids.clone(),
                keepalive: true,
            },
            Setup {
                label: format!("kad, policy {} levels up", DEPTH - 1),
                cgroup: deep,
                programs: kad_ids.clone(),
                keepalive: true,
            },
            Setup {
                label: "kad, neighbour without policy".into(),
                cgroup: neighbour,
                programs: kad_ids.clone(),
                keepalive: false,
            },
        ];
        let part2 = self.measure(&setups2)?;
        print_table(&setups2, &part2);
        println!("   kad's programs that ran, ns per socket:");
        for (setup, summary) in setups2.iter().zip(&part2).skip(1) {
            let ran: Vec<String> = kad_progs
                .iter()
                .filter_map(|(id, name)| {
                    let (runs, ns) = summary.per_prog.get(id).copied()?;
                    // Programs that ran for others (mkdir, a listener's SO_REUSEADDR) add ~0.
                    (runs > 0.0 && ns >= 0.5).then(|| format!("{name} {ns:.0}"))
                })
                .collect();
            println!("     {:<28} {}", setup.label, ran.join(", "));
        }
        let flat = part2[1].sock_ns / k.sock_ns;
        let depth = part2[2].sock_ns / k.sock_ns;
        println!(
            "   (the empty program: {:.0} ns/socket here, {:.0} in part 1)",
            part2[0].sock_ns, e.sock_ns
        );
        goal(
            &format!("per-socket cost, {policies} policies / 1"),
            flat,
            "flat, taken as <= 1.1",
            flat <= 1.1,
        );
        goal(
            &format!("per-socket cost, socket at depth {DEPTH} / 1 policy"),
            depth,
            "flat, taken as <= 1.1",
            depth <= 1.1,
        );
        println!(
            "   a socket of a cgroup without a policy next to policy cgroups (below kad's \
             anchor) costs {:.0} ns",
            part2[3].sock_ns
        );
        let rss_mb = rss as f64 / 1024.0;
        println!(
            "   daemon RSS: {:.1} MB with 1 policy, {rss_mb:.1} MB with {policies}",
            rss1 as f64 / 1024.0
        );
        goal("daemon RSS (MB)", rss_mb, "< 30", rss_mb < 30.0);
        println!("   daemon descriptors: {fds1} with 1 policy, {fds} with {policies}");
        let all = median_duration(&mut latencies.clone());
        let first = median_duration(&mut latencies[..500].to_vec());
        let last = median_duration(&mut latencies[SCALE_POLICIES - 500..].to_vec());
        println!(
            "   set over the control socket, median: {:.2} ms for the first 500, {:.2} ms over \
             all {SCALE_POLICIES}, {:.2} ms for the last 500",
            ms(first),
            ms(all),
            ms(last)
        );
        let cli_median = ms(median_duration(&mut cli));
        goal(
            &format!("`kad set` (CLI) median at {policies} policies, ms"),
            cli_median,
            "< 5",
            cli_median < 5.0,
        );
        let (list_median, list_p99, sets) = self.list_under_writes(&scale)?;
        println!(
            "   `list` of {policies} policies while {WRITERS} clients loop `set`: median {:.2} ms, \
             p99 {:.2} ms ({sets} sets meanwhile)",
            ms(list_median),
            ms(list_p99)
        );

        println!();
        self.existing()?;
        Ok(())
    }

    /// `list` latencies (median, p99) while `WRITERS` clients loop `set` on the scale policies
    /// (alternating two values, so each is a change), and the sets made meanwhile: reads are
    /// answered from the daemon's snapshot, not behind the changes.
    fn list_under_writes(&self, scale: &Path) -> Result<(Duration, Duration, usize)> {
        let stop = AtomicBool::new(false);
        let sets = std::sync::atomic::AtomicUsize::new(0);
        let mut latencies = Vec::with_capacity(LIST_SAMPLES);
        std::thread::scope(|s| -> Result<()> {
            let writers: Vec<_> = (0..WRITERS)
                .map(|w| {
                    let (stop, sets) = (&stop, &sets);
                    s.spawn(move || -> Result<()> {
                        let mut i = 0;
                        while !stop.load(Ordering::Relaxed) {
                            let path =
                                scale.join(format!("p{:05}", (w * 500 + i) % SCALE_POLICIES));
                            let idle = IDLE + 1 + (i as u32 % 2);
                            self.set(&path, (idle, INTVL, CNT))?;
                            sets.fetch_add(1, Ordering::Relaxed);
                            i += 1;
                        }
                        Ok(())
                    })
                })
                .collect();
            let timed = (|| -> Result<()> {
                // The writers get going first.
                std::thread::sleep(Duration::from_millis(200));
                for _ in 0..LIST_SAMPLES {
                    check_interrupted()?;
                    let began = Instant::now();
                    self.policy_count()?;
                    latencies.push(began.elapsed());
                }
                Ok(())
            })();
            stop.store(true, Ordering::Relaxed);
            for writer in writers {
                writer
                    .join()
                    .map_err(|_| anyhow::anyhow!("a set client panicked"))??;
            }
            timed
        })?;
        latencies.sort_unstable();
        let p99 = latencies[(latencies.len() * 99 / 100).min(latencies.len() - 1)];
        Ok((
            median_duration(&mut latencies),
            p99,
            sets.load(Ordering::Relaxed),
        ))
    }

    /// After a failure: whether the daemon is still there, and the end of its log.
    fn report_daemon(&mut self) {
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

    /// A network namespace with loopback up and no TIME_WAIT, removed by the guard.
    fn make_netns(&mut self) -> Result<()> {
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
    fn top_cgroup(&mut self, what: &str) -> Result<PathBuf> {
        let path = self.cg_root.join(format!("{}-{what}", self.name));
        mkdir(&path)?;
        self.guard.cgroups.push(path.clone());
        Ok(path)
    }

    /// Builds a C sock_ops program with clang, pins it and attaches it to `cgroup` with
    /// bpftool. Returns its program id.
    fn load_c(&mut self, name: &str, source: &str, bpffs: &Path, cgroup: &Path) -> Result<u64> {
        // Never the root: it would act on every connection of the machine.
        ensure!(
            cgroup != self.cg_root && cgroup.starts_with(&self.cg_root),
            "refusing to attach to {}",
            cgroup.display()
        );
        let src = self.tmp.join(format!("{name}.bpf.c"));
        let obj = self.tmp.join(format!("{name}.bpf.o"));
        std::fs::write(&src, source)?;
        let arch_include = format!("/usr/include/{}-linux-gnu", std::env::consts::ARCH);
        let define = |k: &str, v: u32| format!("-D{k}={v}");
        crate::run(
            Command::new("clang")
                .args(["-O2", "-g", "-target", "bpf", "-I"])
                .arg(&arch_include)
                .arg(define("IDLE", IDLE))
                .arg(define("INTVL", INTVL))
                .arg(define("CNT", CNT))
                .arg("-c")
                .arg(&src)
                .arg("-o")
                .arg(&obj),
        )
        .with_context(|| format!("build the {name} program with clang"))?;
        let pin = bpffs.join(name);
        crate::run(
            Command::new("bpftool")
                .args(["prog", "load"])
                .arg(&obj)
                .arg(&pin)
                .args(["type", "sockops"]),
        )?;
        crate::run(
            Command::new("bpftool")
                .args(["cgroup", "attach"])
                .arg(cgroup)
                .args(["sock_ops", "pinned"])
                .arg(&pin),
        )?;
        self.guard
            .attached
            .push((cgroup.to_path_buf(), pin.clone()));
        let info = bpftool(&["prog", "show", "pinned", &pin.to_string_lossy()])?;
        info["id"]
            .as_u64()
            .with_context(|| format!("no program id for {}", pin.display()))
    }

    fn start_daemon(&mut self, bpffs: &Path) -> Result<()> {
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

    /// One request over the control socket (what `kad` does, without a process per call).
    fn control(&self, request: &Value) -> Result<Value> {
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

    fn set(&self, cgroup: &Path, (idle, intvl, cnt): (u32, u32, u32)) -> Result<()> {
        self.control(&json!({
            "cmd": "set",
            "cgroup": cgroup,
            "policy": {"mode": "on", "idle": idle, "intvl": intvl, "cnt": cnt},
        }))?;
        Ok(())
    }

    fn kad_set_cli(&self, cgroup: &Path, (idle, intvl, cnt): (u32, u32, u32)) -> Result<()> {
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
    fn counters(&self, cgroup: &Path) -> Result<Value> {
        let reply = self.control(&json!({"cmd": "stats"}))?;
        let wanted = cgroup.to_string_lossy();
        reply["stats"]
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["cgroup"] == *wanted))
            .cloned()
            .with_context(|| format!("kad stats has no row for {wanted}"))
    }

    fn policy_count(&self) -> Result<usize> {
        let reply = self.control(&json!({"cmd": "list"}))?;
        reply["policies"]
            .as_array()
            .map(Vec::len)
            .context("kad list: no policies array")
    }

    fn rss_kb(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.daemon_pid))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .context("no VmRSS in the daemon's status")
    }

    fn fds(&self) -> Result<usize> {
        Ok(std::fs::read_dir(format!("/proc/{}/fd", self.daemon_pid))?.count())
    }

    /// Alternating rounds of the loop over the set-ups (the order rotates each round);
    /// the programs' run counters are read around each run.
    fn measure(&mut self, setups: &[Setup]) -> Result<Vec<Summary>> {
        // Warm-up, not counted; it also checks that each set-up does what it should.
        for setup in setups {
            self.churn(setup, CONNECTIONS / 5)?;
        }
        let mut rounds: Vec<Vec<Round>> = setups.iter().map(|_| Vec::new()).collect();
        for r in 0..ROUNDS {
            for k in 0..setups.len() {
                check_interrupted()?;
                let i = (r + k) % setups.len();
                let before = prog_stats()?;
                let conn_ns = self.churn(&setups[i], CONNECTIONS)?;
                let after = prog_stats()?;
                let per_prog = setups[i]
                    .programs
                    .iter()
                    .map(|id| {
                        let (b, a) = (
                            before.get(id).copied().unwrap_or_default(),
                            after.get(id).copied().unwrap_or_default(),
                        );
                        let delta = ProgStat {
                            runs: a.runs.saturating_sub(b.runs),
                            ns: a.ns.saturating_sub(b.ns),
                        };
                        (*id, delta)
                    })
                    .collect();
                rounds[i].push(Round { conn_ns, per_prog });
            }
        }
        Ok(rounds.iter().map(|r| summarize(r)).collect())
    }

    /// Runs the loop in a fresh process in the set-up's cgroup; returns ns per connection.
    fn churn(&mut self, setup: &Setup, count: u64) -> Result<u64> {
        let out = self
            .in_cgroup(&setup.cgroup, &["churn", &count.to_string()])?
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .context("run the bench loop")?;
        if !out.status.success() {
            bail!(
                "bench loop in {}: {}",
                setup.cgroup.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let words: Vec<&str> = text.split_whitespace().collect();
        let [ns, client, server] = words.as_slice() else {
            bail!("bench loop printed {text:?}");
        };
        // Both ends of a probe connection: on where the set-up sets keepalive, off elsewhere.
        let want = if setup.keepalive { "1" } else { "0" };
        ensure!(
            *client == want && *server == want,
            "{}: a connection got SO_KEEPALIVE {client} (connecting) / {server} (accepted), \
             expected {want}",
            setup.label
        );
        ns.parse().context("bench loop output")
    }

    /// This binary's bench worker, started inside `cgroup`.
    fn in_cgroup(&self, cgroup: &Path, args: &[&str]) -> Result<Command> {
        let procs = File::options()
            .write(true)
            .open(cgroup.join("cgroup.procs"))
            .with_context(|| format!("open {}/cgroup.procs", cgroup.display()))?;
        let netns = self
            .netns
            .as_ref()
            .context("no network namespace")?
            .try_clone()?;
        let mut command = Command::new(&self.worker);
        command.arg("bench-worker").args(args);
        // SAFETY: only setns(2) and write(2) between fork and exec; "0" moves the writing
        // process. The descriptors live in the closure until the command is dropped.
        unsafe {
            command.pre_exec(move || {
                if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(command)
    }

    /// Part 3: existing connections get a policy set after they were made.
    fn existing(&mut self) -> Result<()> {
        let cgroup = self.top_cgroup("conns")?;
        // Each process holds both ends of its connections, within its descriptor limit.
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: a valid rlimit out-parameter.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
            bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        let per_process_max = (limit.rlim_max.min(1 << 20) as usize).saturating_sub(64) / 2;
        ensure!(
            per_process_max >= 1000,
            "RLIMIT_NOFILE hard limit {} is too low to hold connections",
            limit.rlim_max
        );
        let processes = EXISTING.div_ceil(per_process_max);
        let each = EXISTING.div_ceil(processes);
        let total = each * processes;
        println!(
            "3. Existing connections: {total} established loopback connections ({} sockets) in \
             {processes} processes (RLIMIT_NOFILE {}) in the bench's network namespace, then \
             `kad set` on their cgroup",
            2 * total,
            limit.rlim_max
        );
        let start = Instant::now();
        let mut holders = Vec::new();
        for _ in 0..processes {
            let mut child = self
                .in_cgroup(&cgroup, &["hold", &each.to_string()])?
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .context("start a connection holder")?;
            let stdin = child.stdin.take().context("holder stdin")?;
            let stdout = BufReader::new(child.stdout.take().context("holder stdout")?);
            self.guard.children.push(child);
            holders.push(Holder {
                stdin,
                stdout,
                port: 0,
            });
        }
        for h in &mut holders {
            let line = h.read_line()?;
            let port = line
                .strip_prefix("READY ")
                .and_then(|p| p.parse().ok())
                .with_context(|| format!("holder said {line:?}"))?;
            h.port = port;
        }
        println!(
            "   connections made in {:.2} s",
            start.elapsed().as_secs_f64()
        );
        let (idle, intvl, cnt) = EXISTING_POLICY;
        let before = check_holders(&mut holders, EXISTING_POLICY)?;
        println!(
            "   before: {} of {} sockets with SO_KEEPALIVE on",
            before.1, before.0
        );
        let log_before = std::fs::read_to_string(&self.log).unwrap_or_default().len();
        let start = Instant::now();
        self.kad_set_cli(&cgroup, EXISTING_POLICY)?;
        let took = start.elapsed();
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let log = log.get(log_before..).unwrap_or_default();
        let logged = log
            .lines()
            .find(|l| l.contains("existing connections updated"))
            .and_then(|l| number_after(l, "sockets="));
        let refresh_ms = span_ms(
            log,
            "anchored kad's programs",
            "existing connections updated",
        );
        let refreshed = self.counters(&cgroup)?["refreshed"].as_u64().unwrap_or(0);
        let after = check_holders(&mut holders, EXISTING_POLICY)?;
        let took_s = took.as_secs_f64();
        println!(
            "   `kad set --idle {idle} --intvl {intvl} --cnt {cnt}` returned after {:.0} ms \
             (the refresh runs before the reply){}",
            took_s * 1000.0,
            refresh_ms
                .map(|m| format!("; the refresh itself took {m:.0} ms (daemon log)"))
                .unwrap_or_default()
        );
        println!(
            "   daemon: existing connections updated, sockets={}; kad stats: refreshed={refreshed} \
             (the {processes} listeners included)",
            logged.map_or("(not logged)".to_string(), |n| n.to_string())
        );
        println!(
            "   after: getsockopt in the holders: {} of {} sockets with keepalive on, {} with \
             {idle}/{intvl}/{cnt}",
            after.1, after.0, after.2
        );
        let (lines, timers) = ss_sample(&self.name, holders[0].port)?;
        println!(
            "   ss sample (port {}): {timers} of {lines} established sockets with a keepalive timer",
            holders[0].port
        );
        goal(
            &format!("{total} existing connections updated in (s)"),
            took_s,
            "< 0.5",
            took_s < 0.5 && after.2 == after.0,
        );
        for h in &mut holders {
            writeln!(h.stdin, "exit")?;
        }
        for child in &mut self.guard.children {
            child.wait()?;
        }
        self.guard.children.clear();
        Ok(())
    }
}

struct Holder {
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    port: u16,
}

impl Holder {
    fn read_line(&mut self) -> Result<String> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("a connection holder exited");
        }
        Ok(line.trim().to_string())
    }
}

/// (sockets, with keepalive on, with exactly `values`) over all holders.
fn check_holders(
    holders: &mut [Holder],
    (idle, intvl, cnt): (u32, u32, u32),
) -> Result<(u64, u64, u64)> {
    let mut sum = (0, 0, 0);
    for h in holders.iter_mut() {
        writeln!(h.stdin, "check {idle} {intvl} {cnt}")?;
    }
    for h in holders.iter_mut() {
        let line = h.read_line()?;
        let n: Vec<u64> = line
            .strip_prefix("CHECK ")
            .map(|r| {
                r.split_whitespace()
                    .filter_map(|w| w.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let [total, on, matching] = n.as_slice() else {
            bail!("holder said {line:?}");
        };
        sum = (sum.0 + total, sum.1 + on, sum.2 + matching);
    }
    Ok(sum)
}

/// Established sockets on either side of `port`, and how many have a keepalive timer.
fn ss_sample(netns: &str, port: u16) -> Result<(usize, usize)> {
    let filter = format!("( sport = :{port} or dport = :{port} )");
    let out = Command::new("ss")
        .args(["-N", netns, "-tnoH", "state", "established", &filter])
        .output()
        .context("run ss")?;
    ensure!(
        out.status.success(),
        "ss: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines = text.lines().filter(|l| !l.trim().is_empty()).count();
    let timers = text
        .lines()
        .filter(|l| l.contains("timer:(keepalive"))
        .count();
    Ok((lines, timers))
}

/// Milliseconds between the first log lines with `from` and `to` (tracing's RFC 3339 times).
fn span_ms(log: &str, from: &str, to: &str) -> Option<f64> {
    let time = |needle: &str| -> Option<f64> {
        let line = log.lines().find(|l| l.contains(needle))?;
        let clock = line.split_whitespace().next()?.split('T').nth(1)?;
        let clock = clock.trim_end_matches('Z');
        let mut parts = clock.split(':');
        let (h, m, s): (f64, f64, f64) = (
            parts.next()?.parse().ok()?,
            parts.next()?.parse().ok()?,
            parts.next()?.parse().ok()?,
        );
        Some((h * 3600.0 + m * 60.0 + s) * 1000.0)
    };
    let span = time(to)? - time(from)?;
    (span >= 0.0).then_some(span)
}

fn summarize(rounds: &[Round]) -> Summary {
    let sockets = 2.0 * CONNECTIONS as f64;
    let mut conn: Vec<f64> = rounds.iter().map(|r| r.conn_ns as f64).collect();
    let mut sock: Vec<f64> = rounds
        .iter()
        .map(|r| r.per_prog.values().map(|p| p.ns).sum::<u64>() as f64 / sockets)
        .collect();
    let runs: u64 = rounds
        .iter()
        .flat_map(|r| r.per_prog.values())
        .map(|p| p.runs)
        .sum();
    let all_sockets = sockets * rounds.len() as f64;
    let mut per_prog: HashMap<u64, (f64, f64)> = HashMap::new();
    for (id, p) in rounds.iter().flat_map(|r| r.per_prog.iter()) {
        let e = per_prog.entry(*id).or_default();
        e.0 += p.runs as f64 / all_sockets;
        e.1 += p.ns as f64 / all_sockets;
    }
    Summary {
        conn_rounds: conn.clone(),
        sock_rounds: sock.clone(),
        conn_ns: median(&mut conn),
        sock_ns: median(&mut sock),
        runs_per_socket: runs as f64 / all_sockets,
        per_prog,
    }
}

/// The median over rounds of `a[round] / b[round]`.
fn paired(a: &[f64], b: &[f64]) -> f64 {
    let mut ratios: Vec<f64> = a.iter().zip(b).map(|(a, b)| a / b).collect();
    median(&mut ratios)
}

fn print_table(setups: &[Setup], summaries: &[Summary]) {
    println!(
        "   {:<28} {:>10} {:>12} {:>10} {:>12}",
        "set-up", "ns/socket", "runs/socket", "µs/conn", "conn/s"
    );
    for (setup, s) in setups.iter().zip(summaries) {
        println!(
            "   {:<28} {:>10.0} {:>12.2} {:>10.1} {:>12.0}",
            setup.label,
            s.sock_ns,
            s.runs_per_socket,
            s.conn_ns / 1000.0,
            1e9 / s.conn_ns
        );
    }
}

fn print_programs(names: &BTreeMap<u64, String>, summary: &Summary) {
    for (id, name) in names {
        let (runs, ns) = summary.per_prog.get(id).copied().unwrap_or_default();
        println!("     {name:<20} {runs:>5.2} runs {ns:>7.0} ns");
    }
}

fn goal(what: &str, value: f64, target: &str, met: bool) {
    println!(
        "   {what}: {value:.3}  (goal {target}: {})",
        if met { "met" } else { "MISSED" }
    );
}

/// The programs of the daemon that pinned its maps in `bpffs`: those named kad_* that use
/// one of those maps (other daemons on the machine load programs with the same names).
fn kad_programs(bpffs: &Path) -> Result<BTreeMap<u64, String>> {
    let mut maps = HashSet::new();
    for map in ["KAD_POLICY", "KAD_PATHS", "KAD_COUNTS", "KAD_MARKS"] {
        let info = bpftool(&["map", "show", "pinned", &bpffs.join(map).to_string_lossy()])?;
        maps.insert(info["id"].as_u64().context("map id")?);
    }
    let progs = bpftool(&["prog", "show"])?;
    let found: BTreeMap<u64, String> = progs
        .as_array()
        .context("bpftool prog show: not a list")?
        .iter()
        .filter(|p| p["name"].as_str().is_some_and(|n| n.starts_with("kad_")))
        .filter(|p| {
            p["map_ids"].as_array().is_some_and(|ids| {
                ids.iter()
                    .any(|m| m.as_u64().is_some_and(|m| maps.contains(&m)))
            })
        })
        .filter_map(|p| Some((p["id"].as_u64()?, p["name"].as_str()?.to_string())))
        .collect();
    ensure!(
        found.values().any(|n| n == "kad_sockops"),
        "kad's programs not found with bpftool"
    );
    Ok(found)
}

/// Run counters of every program on the machine.
fn prog_stats() -> Result<HashMap<u64, ProgStat>> {
    let progs = bpftool(&["prog", "show"])?;
    Ok(progs
        .as_array()
        .context("bpftool prog show: not a list")?
        .iter()
        .filter_map(|p| {
            Some((
                p["id"].as_u64()?,
                ProgStat {
                    // Absent until the program has run with stats on.
                    runs: p["run_cnt"].as_u64().unwrap_or(0),
                    ns: p["run_time_ns"].as_u64().unwrap_or(0),
                },
            ))
        })
        .collect())
}

fn bpftool(args: &[&str]) -> Result<Value> {
    let out = Command::new("bpftool")
        .args(args)
        .arg("--json")
        .output()
        .context("run bpftool")?;
    ensure!(
        out.status.success(),
        "bpftool {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("bpftool {} output", args.join(" ")))
}

fn mkdir(path: &Path) -> Result<()> {
    std::fs::create_dir(path).with_context(|| format!("mkdir {}", path.display()))
}

fn number_after(text: &str, key: &str) -> Option<u64> {
    let rest = &text[text.find(key)? + key.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn median_duration(values: &mut [Duration]) -> Duration {
    values.sort_unstable();
    values[values.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
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

// ---------------------------------------------------------------------------------------------
// The worker: `xtask bench-worker churn N | hold N`, started inside a measured cgroup.

pub fn worker(args: &[String]) -> Result<()> {
    match args {
        [mode, n] if mode == "churn" => churn(n.parse().context("churn count")?),
        [mode, n] if mode == "hold" => hold(n.parse().context("hold count")?),
        _ => bail!("usage: xtask bench-worker churn N | hold N"),
    }
}

/// Opens and closes `count` loopback connections to itself; prints the mean ns per connection,
/// then SO_KEEPALIVE of both ends of one connection made before the timed loop.
fn churn(count: u64) -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let client = TcpStream::connect(addr)?;
    let (server, _) = listener.accept()?;
    let on = |s: &TcpStream| getsockopt(s, libc::SOL_SOCKET, libc::SO_KEEPALIVE);
    let (client_on, server_on) = (on(&client)?, on(&server)?);
    drop((client, server));
    let start = Instant::now();
    for _ in 0..count {
        let client = TcpStream::connect(addr).context("connect")?;
        let (server, _) = listener.accept().context("accept")?;
        // A plain close: no TIME_WAIT in this namespace, and no error on either end.
        drop((client, server));
    }
    let ns = start.elapsed().as_nanos() / u128::from(count.max(1));
    println!("{ns} {client_on} {server_on}");
    Ok(())
}

fn getsockopt(stream: &TcpStream, level: i32, name: i32) -> Result<i32> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: value and len are valid for the call.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    ensure!(
        rc == 0,
        "getsockopt({level}, {name}): {}",
        std::io::Error::last_os_error()
    );
    Ok(value)
}

/// Holds `count` established loopback connections (both ends); prints "READY <port>", then
/// answers "check IDLE INTVL CNT" with "CHECK <sockets> <keepalive on> <with those values>"
/// until "exit" or the end of its input.
fn hold(count: usize) -> Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid rlimit pointers.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut pairs = Vec::with_capacity(count);
    for i in 0..count {
        let client = TcpStream::connect(addr).with_context(|| format!("connect #{i}"))?;
        let (server, _) = listener.accept().with_context(|| format!("accept #{i}"))?;
        pairs.push((client, server));
    }
    let mut stdout = std::io::stdout();
    writeln!(stdout, "READY {}", addr.port())?;
    stdout.flush()?;
    for line in std::io::stdin().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["check", idle, intvl, cnt] => {
                let want: [i32; 3] = [idle.parse()?, intvl.parse()?, cnt.parse()?];
                let (mut on, mut matching) = (0, 0);
                for s in pairs.iter().flat_map(|(c, s)| [c, s]) {
                    if getsockopt(s, libc::SOL_SOCKET, libc::SO_KEEPALIVE)? == 0 {
                        continue;
                    }
                    on += 1;
                    let got = [
                        getsockopt(s, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE)?,
                        getsockopt(s, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL)?,
                        getsockopt(s, libc::IPPROTO_TCP, libc::TCP_KEEPCNT)?,
                    ];
                    if got == want {
                        matching += 1;
                    }
                }
                writeln!(stdout, "CHECK {} {on} {matching}", 2 * pairs.len())?;
                stdout.flush()?;
            }
            ["exit"] => break,
            _ => bail!("unknown command {line:?}"),
        }
    }
    drop(pairs);
    Ok(())
}
