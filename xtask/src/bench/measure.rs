//! The alternating rounds shared by parts 1 and 2: each set-up's loop run in turn, the
//! programs' run counters read around each run, and the rounds summed up and printed.
use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    process::Stdio,
    time::Duration,
};

use anyhow::{bail, ensure, Context as _, Result};

use super::{
    guard::check_interrupted,
    programs::{prog_stats, ProgStat},
    Bench, CONNECTIONS, ROUNDS,
};

/// One measured set-up: where the loop runs and which programs are its cost.
pub(super) struct Setup {
    pub(super) label: String,
    pub(super) cgroup: PathBuf,
    pub(super) programs: Vec<u64>,
    /// Whether the loop's sockets must come out with keepalive on.
    pub(super) keepalive: bool,
}

struct Round {
    conn_ns: u64,
    per_prog: HashMap<u64, ProgStat>,
}

pub(super) struct Summary {
    /// Per round: wall time per connection, and the programs' run time per socket.
    pub(super) conn_rounds: Vec<f64>,
    pub(super) sock_rounds: Vec<f64>,
    /// Median wall time per connection of the loop.
    pub(super) conn_ns: f64,
    /// Median over rounds of the programs' run time per socket.
    pub(super) sock_ns: f64,
    pub(super) runs_per_socket: f64,
    /// Per program, over all rounds: (runs, ns) per socket.
    pub(super) per_prog: HashMap<u64, (f64, f64)>,
}

impl Bench {
    /// Alternating rounds of the loop over the set-ups (the order rotates each round);
    /// the programs' run counters are read around each run.
    pub(super) fn measure(&mut self, setups: &[Setup]) -> Result<Vec<Summary>> {
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
pub(super) fn paired(a: &[f64], b: &[f64]) -> f64 {
    let mut ratios: Vec<f64> = a.iter().zip(b).map(|(a, b)| a / b).collect();
    median(&mut ratios)
}

pub(super) fn print_table(setups: &[Setup], summaries: &[Summary]) {
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

pub(super) fn print_programs(names: &BTreeMap<u64, String>, summary: &Summary) {
    for (id, name) in names {
        let (runs, ns) = summary.per_prog.get(id).copied().unwrap_or_default();
        println!("     {name:<20} {runs:>5.2} runs {ns:>7.0} ns");
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

pub(super) fn median_duration(values: &mut [Duration]) -> Duration {
    values.sort_unstable();
    values[values.len() / 2]
}

pub(super) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
