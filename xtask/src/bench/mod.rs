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
//! 4. A node with hundreds of pods (`--node` runs it alone): 250 pods in a kubelet's cgroupfs
//!    layout below a bench cgroup, each with its own network namespace and 100 connections;
//!    `kad set` on `kubepods` and a namespace default through `--pod-events` reach them all,
//!    timed and checked; then pod churn through `--pod-events`, each pod's first connection
//!    checked, the daemon's CPU and RSS read.
//! 5. Docker (`--docker-only` runs it alone). 100 labelled containers started one after the
//!    other by a dockerd of the bench's own, each first connection checked, and the time from
//!    `create` to the policy in force.
//! 6. The control socket (`--control-only` runs it alone): root's `kad set` p50/p99 idle and
//!    while another user floods the socket (oversized request lines, reconnects, `status` at
//!    10,000 policies), as a ratio to idle with the 2x goal; the daemon's CPU and RSS.
//!
//! Parts 4, 5 and 6 each start a daemon of their own (pod events; `--docker SOCKET`); the daemon
//! of parts 1–3, and every other, runs with `--no-docker`.
//!
//! The connections are made in a network namespace of the bench's own, where TIME_WAIT is
//! switched off (`tcp_max_tw_buckets` 0): hundreds of thousands of connections leave nothing
//! behind, take no ports from the host, and close without an error (no error-path program
//! runs). The goals are reported, not asserted: the bench fails only when it cannot measure.
//! Everything it creates (cgroups under the cgroup2 root, the network namespace, pins,
//! processes, the daemon) is removed by a guard, also on failure.
//!
//! Here the run and the goals' printing; `floor`, `scale`, `existing`, `node` (with `churn`),
//! `docker` and `control` are its six parts,
//! `measure` the alternating rounds they share, `worker` the process each round runs in,
//! `programs` the C programs (`c/`) and kad's found with bpftool, `daemon` the kad daemon under
//! measure, `sandbox` the bench's network namespace and cgroups, `guard` the clean-up.
mod churn;
mod control;
mod daemon;
mod docker;
mod existing;
mod floor;
mod guard;
mod measure;
mod node;
mod programs;
mod sandbox;
mod scale;
mod worker;

use std::{
    collections::BTreeMap,
    fs::File,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

pub use self::worker::worker;
use self::{
    guard::{stop_on_signals, Guard, STATS_KNOB},
    programs::{kad_programs, ANCHOR_C, EMPTY_C},
    sandbox::cgroup2_root,
};

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

/// Part 4: pods on the node, and connections held in each.
const NODE_PODS: usize = 250;
const NODE_CONNECTIONS: usize = 100;
/// `kad set` on `kubepods`, then the pods' namespace default, then the churned pods' own
/// annotation: values of their own, so a socket's values say which one reached it.
const NODE_SET_POLICY: (u32, u32, u32) = (200, 40, 6);
const NODE_NAMESPACE_POLICY: (u32, u32, u32) = (210, 45, 8);
const CHURN_POLICY: (u32, u32, u32) = (220, 50, 9);
/// Pods created (and as many deleted) a second, for how long, and how long each lives.
const CHURN_RATE: usize = 20;
const CHURN_SECONDS: usize = 60;
const CHURN_LIFETIME: std::time::Duration = std::time::Duration::from_secs(2);

/// One run: its names and paths, the daemon, and the guard of all it made.
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

/// The programs measured and where they are attached: each C program on a cgroup of its own,
/// kad's on the cgroup of its one policy (part 2 adds policies).
struct Attached {
    empty_cg: PathBuf,
    empty: u64,
    anchor_cg: PathBuf,
    anchor: u64,
    kad_cg: PathBuf,
    /// kad's programs by id, with their names.
    kad: BTreeMap<u64, String>,
}

impl Attached {
    fn kad_ids(&self) -> Vec<u64> {
        self.kad.keys().copied().collect()
    }
}

/// What `cargo xtask bench` runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Parts {
    All,
    /// `--floor-only`: part 1.
    Floor,
    /// `--node`: part 4.
    Node,
    /// `--docker-only`: part 5.
    Docker,
    /// `--control-only`: part 6.
    Control,
}

pub fn run(root: &Path, parts: Parts) -> Result<()> {
    stop_on_signals();
    let cg_root = cgroup2_root()?;
    let name = format!("kad-bench-{}", std::process::id());
    let tmp = std::env::temp_dir().join(&name);
    let mut bench = Bench {
        guard: Guard::default(),
        kad: crate::dist::kad_bin(root),
        worker: std::env::current_exe().context("the xtask binary")?,
        cg_root,
        socket: tmp.join("kad.sock"),
        log: tmp.join("daemon.log"),
        tmp,
        name,
        daemon_pid: 0,
        netns: None,
    };
    let result = bench.run(parts);
    if result.is_err() {
        bench.report_daemon();
    }
    result
}

impl Bench {
    fn run(&mut self, parts: Parts) -> Result<()> {
        std::fs::create_dir_all(&self.tmp)
            .with_context(|| format!("mkdir {}", self.tmp.display()))?;
        self.guard.tmp = Some(self.tmp.clone());
        let bpffs = Path::new("/sys/fs/bpf").join(&self.name);
        std::fs::create_dir(&bpffs).with_context(|| format!("mkdir {}", bpffs.display()))?;
        self.guard.bpffs = Some(bpffs.clone());
        // Parts 4 and 5 alone: each starts a daemon of its own.
        if parts == Parts::Control {
            println!(
                "kad bench, part 6 alone: kernel {}, {} CPUs",
                kernel_release(),
                std::thread::available_parallelism().map_or(0, |n| n.get())
            );
            println!();
            return self.control_socket(&bpffs);
        }
        if let Some(part) = match parts {
            Parts::Node => Some(4),
            Parts::Docker => Some(5),
            Parts::All | Parts::Floor | Parts::Control => None,
        } {
            println!(
                "kad bench, part {part} alone: kernel {}, {} CPUs",
                kernel_release(),
                std::thread::available_parallelism().map_or(0, |n| n.get())
            );
            println!();
            return if parts == Parts::Node {
                self.node(&bpffs)
            } else {
                self.docker(&bpffs)
            };
        }
        self.make_netns()?;

        let empty_cg = self.top_cgroup("empty")?;
        let anchor_cg = self.top_cgroup("anchor")?;
        let kad_cg = self.top_cgroup("kad")?;
        let empty = self.load_c("empty", EMPTY_C, &bpffs, &empty_cg)?;
        let anchor = self.load_c("anchor", ANCHOR_C, &bpffs, &anchor_cg)?;
        self.start_daemon(&bpffs.join("kad"), &[])?;
        self.set(&kad_cg, (IDLE, INTVL, CNT))?;
        let attached = Attached {
            kad: kad_programs(&bpffs.join("kad"))?,
            empty_cg,
            empty,
            anchor_cg,
            anchor,
            kad_cg,
        };

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
        let floor = self.floor(&attached)?;
        if parts == Parts::Floor {
            return Ok(());
        }

        println!();
        self.scale(&attached, &floor)?;

        println!();
        self.existing()?;

        // Part 4 has a daemon of its own, reading pod events.
        self.stop_daemon();
        println!();
        self.node(&bpffs)?;

        // Part 5 too (it stops part 4's first), watching the bench's dockerd.
        println!();
        self.docker(&bpffs)?;

        // Part 6 too: 10,000 policies from its config file.
        self.stop_daemon();
        println!();
        self.control_socket(&bpffs)?;
        Ok(())
    }
}

/// A goal's line: reported, not asserted.
fn goal(what: &str, value: f64, target: &str, met: bool) {
    println!(
        "   {what}: {value:.3}  (goal {target}: {})",
        if met { "met" } else { "MISSED" }
    );
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}
