//! Part 2, scale: the cost per socket with 10,000 policies and 8 cgroups below a policy,
//! the daemon's memory and descriptors, and how long `kad set` and `list` take.
use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::Result;

use super::{
    floor::Floor,
    goal,
    guard::check_interrupted,
    measure::{median_duration, ms, print_table, Setup},
    sandbox::mkdir,
    Attached, Bench, CLI_SETS, CNT, DEPTH, IDLE, INTVL, LIST_SAMPLES, SCALE_POLICIES, WRITERS,
};

impl Bench {
    pub(super) fn scale(&mut self, attached: &Attached, floor: &Floor) -> Result<()> {
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
        let kad_ids = attached.kad_ids();
        let setups2 = vec![
            Setup {
                label: "empty (C, returns 1)".into(),
                cgroup: attached.empty_cg.clone(),
                programs: vec![attached.empty],
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
            let ran: Vec<String> = attached
                .kad
                .iter()
                .filter_map(|(id, name)| {
                    let (runs, ns) = summary.per_prog.get(id).copied()?;
                    // Programs that ran for others (mkdir, a listener's SO_REUSEADDR) add ~0.
                    (runs > 0.0 && ns >= 0.5).then(|| format!("{name} {ns:.0}"))
                })
                .collect();
            println!("     {:<28} {}", setup.label, ran.join(", "));
        }
        let flat = part2[1].sock_ns / floor.kad_ns;
        let depth = part2[2].sock_ns / floor.kad_ns;
        println!(
            "   (the empty program: {:.0} ns/socket here, {:.0} in part 1)",
            part2[0].sock_ns, floor.empty_ns
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
            floor.rss_kb as f64 / 1024.0
        );
        goal("daemon RSS (MB)", rss_mb, "< 30", rss_mb < 30.0);
        println!(
            "   daemon descriptors: {} with 1 policy, {fds} with {policies}",
            floor.fds
        );
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
}
