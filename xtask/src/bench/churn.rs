//! Part 4's pod churn: `CHURN_RATE` pods a second created and deleted for `CHURN_SECONDS`, on
//! the node of part 4's pods. Each pod as a watcher and the kubelet would make it, without the
//! kubelet's delays: its event (with its own `kad.dev/keepalive` annotation) written to the
//! FIFO, its cgroup made at once, a process started in it that makes the pod's first
//! connection (in a network namespace of its own) and says whether both ends have the pod's
//! policy. `CHURN_LIFETIME` later: the process ends, the cgroup is removed, `pod_deleted`.
//! The daemon's CPU time and RSS are read around and during the churn.
use std::{
    collections::{HashMap, VecDeque},
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, ChildStdin, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::json;

use super::{
    existing::{clock_ms, clock_now_ms},
    goal,
    guard::check_interrupted,
    node::{pod_uid, LogTail, Node},
    sandbox::mkdir,
    Bench, CHURN_LIFETIME, CHURN_POLICY, CHURN_RATE, CHURN_SECONDS, NODE_PODS,
};

/// How long the daemon may take to catch up with the churn's events after it.
const CATCH_UP: Duration = Duration::from_secs(180);

/// A churned pod while it lives.
struct ChurnPod {
    uid: String,
    cgroup: PathBuf,
    child: Child,
    /// Closed to end the pod's process.
    stdin: Option<ChildStdin>,
    delete_at: Instant,
}

impl Bench {
    pub(super) fn churn_pods(&mut self, node: &mut Node) -> Result<()> {
        let pods = CHURN_RATE * CHURN_SECONDS;
        let (idle, intvl, cnt) = CHURN_POLICY;
        println!(
            "   c. Pod churn: {CHURN_RATE} pods a second created and deleted for {CHURN_SECONDS} \
             s ({pods} pods, each living {} s, next to the {NODE_PODS}) through --pod-events, \
             each pod annotated `idle={idle},intvl={intvl},cnt={cnt}`; its cgroup made right \
             after its event, then its first connection",
            CHURN_LIFETIME.as_secs_f64()
        );
        let mut tail = LogTail::open(&self.log)?;
        let (rss_before, _) = self.rss_hwm_kb()?;
        let cpu_before = self.cpu_s()?;
        let wait_before = self.cpu_wait_s()?;
        let start = Instant::now();
        let interval = Duration::from_secs(1) / CHURN_RATE as u32;
        let mut live: VecDeque<ChurnPod> = VecDeque::new();
        // Per pod (by name): when its event was written, as the log's clock (ms of the day).
        let mut written: HashMap<String, f64> = HashMap::new();
        let (mut misses, mut late) = (0usize, 0usize);
        let mut rss_max = rss_before;
        let mut next_sample = start;
        let mut log = String::new();
        for i in 0..pods {
            check_interrupted()?;
            let due = start + interval * i as u32;
            while let Some(pod) = live.front() {
                if pod.delete_at > due {
                    break;
                }
                let pod = live.pop_front().context("a live pod")?;
                self.delete_pod(node, pod)?;
            }
            let now = Instant::now();
            if now < due {
                std::thread::sleep(due - now);
            } else if now > due + interval {
                late += 1;
            }
            if Instant::now() >= next_sample {
                self.daemon_alive()?;
                rss_max = rss_max.max(self.rss_hwm_kb()?.0);
                next_sample += Duration::from_secs(1);
                for line in tail.lines()? {
                    log.push_str(&line);
                    log.push('\n');
                }
            }
            let name = format!("churn-{i:04}");
            let uid = pod_uid(1, i);
            written.insert(name.clone(), clock_now_ms());
            node.send(&json!({
                "event": "pod", "uid": uid, "namespace": "churn", "name": name,
                "qos": "Burstable", "annotation": format!("idle={idle},intvl={intvl},cnt={cnt}"),
            }))?;
            // The kubelet's part, at once: the pod's cgroup, then a process in it.
            let cgroup = node.burstable.join(format!("pod{uid}"));
            mkdir(&cgroup)?;
            let mut child = self
                .in_pod(
                    &cgroup,
                    &[
                        "first",
                        &idle.to_string(),
                        &intvl.to_string(),
                        &cnt.to_string(),
                    ],
                )?
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .context("start a churned pod's process")?;
            let stdin = child.stdin.take();
            let mut line = String::new();
            BufReader::new(child.stdout.take().context("pod stdout")?).read_line(&mut line)?;
            let ends: Vec<&str> = line.split_whitespace().collect();
            let ["FIRST", client, server] = ends.as_slice() else {
                bail!("churned pod {name} said {line:?}");
            };
            if *client != "1" || *server != "1" {
                misses += 1;
            }
            live.push_back(ChurnPod {
                uid,
                cgroup,
                child,
                stdin,
                delete_at: due + CHURN_LIFETIME,
            });
        }
        while let Some(pod) = live.pop_front() {
            check_interrupted()?;
            let now = Instant::now();
            if now < pod.delete_at {
                std::thread::sleep(pod.delete_at - now);
            }
            self.delete_pod(node, pod)?;
        }
        // The minute's figures, read as the last pod is deleted.
        let churned = start.elapsed();
        let cpu = self.cpu_s()? - cpu_before;
        let waited = self.cpu_wait_s()? - wait_before;
        let (rss_after, hwm) = self.rss_hwm_kb()?;
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        // Then the daemon catches up: it has when it has removed the last pod's policy.
        let last_removed = format!("pod{}", pod_uid(1, pods - 1));
        let caught_up = |log: &str| {
            log.lines()
                .any(|l| l.contains("pod policy removed") && l.contains(&last_removed))
        };
        let deadline = Instant::now() + CATCH_UP;
        loop {
            for line in tail.lines()? {
                log.push_str(&line);
                log.push('\n');
            }
            if caught_up(&log) || Instant::now() > deadline {
                break;
            }
            check_interrupted()?;
            self.daemon_alive()?;
            std::thread::sleep(Duration::from_millis(5));
        }
        let behind = Instant::now() - (start + churned);
        let cpu_all = self.cpu_s()? - cpu_before;
        // `list` answers from a snapshot the daemon publishes after its changes: a moment.
        let mut policies = self.policy_paths()?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while policies.iter().any(|p| p.contains("-0001-4000-")) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            policies = self.policy_paths()?;
        }

        // From an event's write to the daemon's "pod policy" line (before it puts the policy
        // in force; the map update follows in the same step).
        let mut latencies: Vec<f64> = log
            .lines()
            .filter(|l| l.contains("pod policy cgroup"))
            .filter_map(|l| {
                let name = l.split("pod=churn/").nth(1)?.split_whitespace().next()?;
                let name = name.trim_matches(|c| c == '"' || c == ',');
                let at = clock_ms(l)?;
                Some(at - written.get(name)?)
            })
            .collect();
        latencies.sort_by(f64::total_cmp);
        let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
        println!(
            "      {pods} pods in {:.1} s ({:.1} a second; {late} started more than one interval \
             late)",
            churned.as_secs_f64(),
            pods as f64 / churned.as_secs_f64()
        );
        if latencies.is_empty() {
            println!("      event to the daemon's pod policy: not found in the daemon's log");
        } else {
            println!(
                "      event written to the daemon's pod policy ({} pods, daemon log): median \
                 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                latencies.len(),
                pct(0.5),
                pct(0.99),
                pct(1.0)
            );
        }
        println!(
            "      daemon CPU over the churn: {cpu:.2} s in {:.1} s ({:.1} % of one core); RSS {:.1} \
             MB before, {:.1} MB max sampled each second, {:.1} MB at the end; peak (VmHWM, the \
             whole run) {:.1} MB",
            churned.as_secs_f64(),
            100.0 * cpu / churned.as_secs_f64(),
            rss_before as f64 / 1024.0,
            rss_max.max(rss_after) as f64 / 1024.0,
            rss_after as f64 / 1024.0,
            hwm as f64 / 1024.0
        );
        println!(
            "      the daemon's threads waited {waited:.2} s for a CPU meanwhile (schedstat; the \
             machine's load average then: {})",
            load.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        );
        let done = log
            .lines()
            .filter(|l| l.contains("pod policy removed") && l.contains("-0001-4000-"))
            .count();
        if caught_up(&log) {
            println!(
                "      the daemon caught up {:.1} s after the churn (its last pod's policy \
                 removed), with {:.2} s more CPU",
                behind.as_secs_f64(),
                cpu_all - cpu
            );
        } else {
            println!(
                "      the daemon had NOT caught up {:.0} s after the churn: {done} of {pods} \
                 pods' policies removed ({:.2} s more CPU meanwhile)",
                behind.as_secs_f64(),
                cpu_all - cpu
            );
        }
        println!(
            "      policies after the churn: {} (the {NODE_PODS} pods' and kubepods': {})",
            policies.len(),
            NODE_PODS + 1
        );
        let churned_left: Vec<&String> = policies
            .iter()
            .filter(|p| p.contains("-0001-4000-"))
            .collect();
        if !churned_left.is_empty() {
            println!(
                "      churned pods' policies left: {}, e.g. {}",
                churned_left.len(),
                churned_left
                    .iter()
                    .take(3)
                    .map(|p| p.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        goal(
            &format!("churned pods (of {pods}) whose first connection lacked its policy"),
            misses as f64,
            "0",
            misses == 0,
        );
        Ok(())
    }

    /// The pod's end as the kubelet and the API server see it: its process gone, its cgroup
    /// removed, then `pod_deleted`.
    fn delete_pod(&mut self, node: &mut Node, mut pod: ChurnPod) -> Result<()> {
        drop(pod.stdin.take());
        pod.child
            .wait()
            .context("wait for a churned pod's process")?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Err(e) = std::fs::remove_dir(&pod.cgroup) {
            if Instant::now() > deadline {
                bail!("rmdir {}: {e}", pod.cgroup.display());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        node.send(&json!({"event": "pod_deleted", "uid": pod.uid}))
    }
}
