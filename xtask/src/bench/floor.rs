//! Part 1, cost at the floor: kad's programs against the EMPTY and ANCHOR C programs, per
//! socket (kernel BPF stats) and in connections per second.
use anyhow::Result;

use super::{
    goal,
    measure::{paired, print_programs, print_table, Setup},
    Attached, Bench, CONNECTIONS, ROUNDS,
};

/// What part 2 compares with.
pub(super) struct Floor {
    /// ns per socket of the empty program.
    pub(super) empty_ns: f64,
    /// ns per socket of kad with one policy.
    pub(super) kad_ns: f64,
    /// The daemon's RSS and descriptors with one policy.
    pub(super) rss_kb: u64,
    pub(super) fds: usize,
}

impl Bench {
    pub(super) fn floor(&mut self, attached: &Attached) -> Result<Floor> {
        println!("1. Cost per socket (kernel BPF stats) and connection rate");
        let setups = vec![
            Setup {
                label: "empty (C, returns 1)".into(),
                cgroup: attached.empty_cg.clone(),
                programs: vec![attached.empty],
                keepalive: false,
            },
            Setup {
                label: "anchor (C, 4 setsockopt)".into(),
                cgroup: attached.anchor_cg.clone(),
                programs: vec![attached.anchor],
                keepalive: true,
            },
            Setup {
                label: "kad (1 policy)".into(),
                cgroup: attached.kad_cg.clone(),
                programs: attached.kad_ids(),
                keepalive: true,
            },
        ];
        let part1 = self.measure(&setups)?;
        print_table(&setups, &part1);
        let (e, a, k) = (&part1[0], &part1[1], &part1[2]);
        println!("   kad's programs, per socket:");
        print_programs(&attached.kad, k);
        let configured = self.counters(&attached.kad_cg)?;
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
        Ok(Floor {
            empty_ns: e.sock_ns,
            kad_ns: k.sock_ns,
            rss_kb: rss1,
            fds: fds1,
        })
    }
}
