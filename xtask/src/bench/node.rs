//! Part 4, a node with hundreds of pods: 250 pods, each a cgroup of a kubelet's cgroupfs layout
//! (`kubepods/burstable/pod<UID>` below a bench cgroup given to the daemon as the kubelet's
//! `--cgroup-root`) and a network namespace of its own with 100 established loopback
//! connections, held by one process per pod. Then a policy reaches them all: `kad set` on
//! `kubepods`, and a namespace default through `--pod-events` (a FIFO the bench writes). Then
//! pod churn (`churn`). Docker's line is part 5 (`docker`).
use std::{
    ffi::{CString, OsStr},
    fs::File,
    io::{Read as _, Seek as _, SeekFrom, Write as _},
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::{json, Value};

use super::{
    existing::{check_holders, clock_ms, clock_now_ms, ss_count, Holder},
    goal,
    guard::check_interrupted,
    sandbox::mkdir,
    Bench, NODE_CONNECTIONS, NODE_NAMESPACE_POLICY, NODE_PODS, NODE_SET_POLICY,
};

/// Where part 4's pods go, and the pod events FIFO.
pub(super) struct Node {
    /// `kubepods/burstable` below the kubelet's cgroup root, where the pods' cgroups are.
    pub(super) burstable: PathBuf,
    pub(super) events: File,
}

impl Node {
    /// One pod event, a JSON line, as a watcher writes it.
    pub(super) fn send(&mut self, event: &Value) -> Result<()> {
        // One write of less than PIPE_BUF: the daemon reads whole lines.
        self.events
            .write_all(format!("{event}\n").as_bytes())
            .context("write to the pod events FIFO")
    }
}

/// A pod's UID (a UUID's shape), unique to this run: `kind` 0 for the held pods, 1 for
/// the churned ones, `i` the pod.
pub(super) fn pod_uid(kind: u32, i: usize) -> String {
    format!("{:08x}-{kind:04x}-4000-8000-{i:012x}", std::process::id())
}

impl Bench {
    /// Part 4. The daemon of parts 1–3 is stopped before: this one reads pod events.
    pub(super) fn node(&mut self, bpffs: &Path) -> Result<()> {
        println!(
            "4. A node with {NODE_PODS} pods: a kubelet's cgroupfs layout below a bench cgroup, \
             each pod its own network namespace with {NODE_CONNECTIONS} established loopback \
             connections (both ends in the pod)"
        );
        let kubelet_root = self.top_cgroup("node")?;
        let relative = kubelet_root
            .strip_prefix(&self.cg_root)
            .context("the bench cgroup is not below the cgroup2 root")?
            .to_path_buf();
        let kubepods = kubelet_root.join("kubepods");
        let burstable = kubepods.join("burstable");
        mkdir(&kubepods)?;
        mkdir(&burstable)?;

        let fifo = self.tmp.join("pod-events");
        let c_fifo = CString::new(fifo.as_os_str().as_bytes())?;
        // SAFETY: a valid NUL-terminated path.
        if unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o600) } != 0 {
            bail!(
                "mkfifo {}: {}",
                fifo.display(),
                std::io::Error::last_os_error()
            );
        }
        // Read and write: the open does not wait for the daemon, and the FIFO never reports
        // an end while the bench holds it.
        let events = File::options()
            .read(true)
            .write(true)
            .open(&fifo)
            .with_context(|| format!("open {}", fifo.display()))?;
        self.log = self.tmp.join("daemon-node.log");
        self.start_daemon(
            &bpffs.join("node"),
            &[
                OsStr::new("--pod-events"),
                fifo.as_os_str(),
                OsStr::new("--kubelet-cgroup-driver"),
                OsStr::new("cgroupfs"),
                OsStr::new("--kubelet-cgroup-root"),
                relative.as_os_str(),
            ],
        )?;
        let mut node = Node { burstable, events };

        let mut holders = self.start_pods(&mut node)?;
        let before = check_holders(&mut holders, NODE_SET_POLICY)?;
        println!(
            "   before: {} of {} sockets with SO_KEEPALIVE on (listeners not counted)",
            before.1, before.0
        );
        self.reach_by_set(&kubepods, &mut holders)?;
        self.reach_by_namespace(&mut node, &mut holders)?;

        println!();
        self.churn_pods(&mut node)?;

        // The daemon's log, kept for a look at its timings (target/ is the build's).
        let kept = self.kad.with_file_name("bench-node-daemon.log");
        if std::fs::copy(&self.log, &kept).is_ok() {
            println!("   the daemon's log: {}", kept.display());
        }

        for h in &mut holders {
            writeln!(h.stdin, "exit")?;
        }
        for child in &mut self.guard.children {
            child.wait()?;
        }
        self.guard.children.clear();
        Ok(())
    }

    /// The pods: cgroup, announced to the daemon (namespace `bench`, no annotation, so no
    /// policy yet), a process holding its connections in a network namespace of its own.
    fn start_pods(&mut self, node: &mut Node) -> Result<Vec<Holder>> {
        let start = Instant::now();
        let mut holders = Vec::with_capacity(NODE_PODS);
        for i in 0..NODE_PODS {
            check_interrupted()?;
            let uid = pod_uid(0, i);
            node.send(&json!({
                "event": "pod", "uid": uid, "namespace": "bench", "name": format!("pod-{i:03}"),
                "qos": "Burstable", "annotation": null,
            }))?;
            let cgroup = node.burstable.join(format!("pod{uid}"));
            mkdir(&cgroup)?;
            let mut command = self.in_pod(&cgroup, &["pod", &NODE_CONNECTIONS.to_string()])?;
            holders.push(Holder::spawn(&mut command, &mut self.guard.children)?);
        }
        for h in &mut holders {
            let line = h.read_line()?;
            h.port = line
                .strip_prefix("READY ")
                .and_then(|p| p.parse().ok())
                .with_context(|| format!("pod holder said {line:?}"))?;
        }
        println!(
            "   {NODE_PODS} pods, {} connections ({} sockets) made in {:.2} s",
            NODE_PODS * NODE_CONNECTIONS,
            2 * NODE_PODS * NODE_CONNECTIONS,
            start.elapsed().as_secs_f64()
        );
        Ok(holders)
    }

    /// `kad set --cgroup .../kubepods`, timed (its refresh runs before it returns).
    fn reach_by_set(&mut self, kubepods: &Path, holders: &mut [Holder]) -> Result<()> {
        let log_before = std::fs::metadata(&self.log).map_or(0, |m| m.len());
        let started = clock_now_ms();
        let start = Instant::now();
        self.kad_set_cli(kubepods, NODE_SET_POLICY)?;
        let took = start.elapsed().as_secs_f64();
        // The daemon logs the refresh's end (before "policy set"): its time against ours.
        let log = read_from(&self.log, log_before)?;
        let refreshed = log
            .lines()
            .find(|l| l.contains("existing connections updated"))
            .and_then(clock_ms)
            .map(|at| at - started);
        let (idle, intvl, cnt) = NODE_SET_POLICY;
        println!(
            "   a. `kad set --cgroup {} --idle {idle} --intvl {intvl} --cnt {cnt}` returned after \
             {:.0} ms{}",
            kubepods.display(),
            took * 1000.0,
            refreshed
                .map(|m| format!(" (daemon log: the refresh done {m:.0} ms after the start)"))
                .unwrap_or_default()
        );
        self.verify_pods(holders, NODE_SET_POLICY, took, "kad set on kubepods")
    }

    /// A namespace default (`kad.dev/keepalive` on namespace `bench`) through the pod
    /// events: timed from the event's write to the last pod's refresh in the daemon's log.
    fn reach_by_namespace(&mut self, node: &mut Node, holders: &mut [Holder]) -> Result<()> {
        let (idle, intvl, cnt) = NODE_NAMESPACE_POLICY;
        let mut tail = LogTail::open(&self.log)?;
        let start = Instant::now();
        node.send(&json!({
            "event": "namespace", "name": "bench",
            "annotation": format!("idle={idle},intvl={intvl},cnt={cnt}"),
        }))?;
        // Every pod's cgroup gets a policy of its own, each refreshed in its namespace.
        let mut refreshed = 0;
        let mut log = String::new();
        let deadline = start + Duration::from_secs(120);
        while refreshed < NODE_PODS {
            check_interrupted()?;
            self.daemon_alive()?;
            ensure!(
                Instant::now() < deadline,
                "after 120 s the daemon had refreshed {refreshed} of {NODE_PODS} pods"
            );
            for line in tail.lines()? {
                if line.contains("existing connections updated") && line.contains("/kubepods/") {
                    refreshed += 1;
                }
                log.push_str(&line);
                log.push('\n');
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let took = start.elapsed().as_secs_f64();
        let first = log.lines().find(|l| l.contains("pod policy"));
        let last = log
            .lines()
            .rfind(|l| l.contains("existing connections updated"));
        let logged = first
            .zip(last)
            .and_then(|(a, b)| Some(clock_ms(b)? - clock_ms(a)?));
        println!(
            "   b. namespace default `kad.dev/keepalive: idle={idle},intvl={intvl},cnt={cnt}` \
             through --pod-events: {NODE_PODS} pod policies, every pod refreshed {:.0} ms after \
             the event was written{}",
            took * 1000.0,
            logged
                .map(|m| format!(" (daemon log, first pod policy to last refresh: {m:.0} ms)"))
                .unwrap_or_default()
        );
        self.verify_pods(holders, NODE_NAMESPACE_POLICY, took, "namespace default")
    }

    /// Every socket checked with getsockopt in its holder; `ss -o` in a sample of the pods'
    /// namespaces; the goal's line.
    fn verify_pods(
        &mut self,
        holders: &mut [Holder],
        policy: (u32, u32, u32),
        took_s: f64,
        what: &str,
    ) -> Result<()> {
        let (total, on, matching) = check_holders(holders, policy)?;
        println!(
            "      getsockopt in the {NODE_PODS} holders: {on} of {total} sockets with keepalive \
             on, {matching} with {}/{}/{}",
            policy.0, policy.1, policy.2
        );
        let (mut lines, mut timers) = (0, 0);
        let sample: Vec<&Holder> = holders.iter().step_by(NODE_PODS.div_ceil(10)).collect();
        for h in &sample {
            let (l, t) = ss_count(Command::new("nsenter").args([
                "-t",
                &h.pid.to_string(),
                "-n",
                "ss",
                "-tnoH",
                "state",
                "established",
            ]))?;
            lines += l;
            timers += t;
        }
        println!(
            "      ss -o in {} pods' namespaces: {timers} of {lines} established sockets with a \
             keepalive timer",
            sample.len()
        );
        goal(
            &format!(
                "{what}: {} connections in {NODE_PODS} namespaces reached in (s)",
                NODE_PODS * NODE_CONNECTIONS
            ),
            took_s,
            "< 1, every socket",
            took_s < 1.0 && matching == total,
        );
        Ok(())
    }

    /// An error if the daemon has exited.
    pub(super) fn daemon_alive(&mut self) -> Result<()> {
        if let Some(Ok(Some(status))) = self.guard.daemon.as_mut().map(|d| d.try_wait()) {
            bail!("kad daemon exited ({status})");
        }
        Ok(())
    }
}

/// The daemon's log from `offset` on.
fn read_from(path: &Path, offset: u64) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("open {}", path.display()))?;
    file.seek(SeekFrom::Start(offset))?;
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    Ok(text)
}

/// The daemon's log as it grows: the whole lines written since the last call.
pub(super) struct LogTail {
    file: File,
    partial: String,
}

impl LogTail {
    /// From the log's current end.
    pub(super) fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).with_context(|| format!("open {}", path.display()))?;
        file.seek(SeekFrom::End(0))?;
        Ok(Self {
            file,
            partial: String::new(),
        })
    }

    pub(super) fn lines(&mut self) -> Result<Vec<String>> {
        let mut bytes = Vec::new();
        self.file.read_to_end(&mut bytes)?;
        self.partial.push_str(&String::from_utf8_lossy(&bytes));
        let Some(end) = self.partial.rfind('\n') else {
            return Ok(Vec::new());
        };
        let rest = self.partial.split_off(end + 1);
        let lines = self.partial.lines().map(str::to_string).collect();
        self.partial = rest;
        Ok(lines)
    }
}
