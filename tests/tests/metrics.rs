//! `/metrics` as operators use it: the alerting rules of dist/prometheus/ checked and
//! unit-tested by promtool, and every query of the Grafana dashboard (dist/grafana/) evaluated
//! by a real Prometheus (Debian's `prometheus`) scraping a real kad on loopback; the bound on
//! per-policy series.
use std::{
    fs,
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use kad_tests::{free_port, kad_env, listen, scrape, wait_for, Daemon, TempDir, TestCgroup};
use serde_json::Value;

const PROMETHEUS: &str = "/usr/bin/prometheus";
const PROMTOOL: &str = "/usr/bin/promtool";

fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

/// False (skipped) in the kernel test VMs, which have no Prometheus: these test kad's files and
/// endpoint, not a kernel feature.
fn on_the_host() -> bool {
    kad_tests::host_only("Prometheus and promtool run on the host")
}

fn require_tool(path: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} is missing: install Debian's prometheus package (cargo xtask setup does)"
    );
}

#[test]
fn promtool_checks_and_unit_tests_the_alerting_rules() {
    if !on_the_host() {
        return;
    }
    require_tool(PROMTOOL);
    let dir = repo_file("dist/prometheus");
    let rules = fs::read_to_string(dir.join("kad-rules.yml")).expect("read kad-rules.yml");
    for alert in [
        "KadDown",
        "KadPolicyNotInForce",
        "KadKeepaliveKillsRising",
        "KadWatcherDisconnected",
    ] {
        assert!(rules.contains(&format!("alert: {alert}\n")), "{alert}");
    }
    for args in [
        ["check", "rules", "kad-rules.yml"],
        ["test", "rules", "kad-rules.test.yml"],
    ] {
        let out = Command::new(PROMTOOL)
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A Prometheus server with a directory of its own, killed by its pid when dropped.
struct Prometheus {
    child: Child,
    addr: String,
    _dir: TempDir,
}

impl Prometheus {
    /// Scrapes `target` (as job "kad") every second and loads kad's alerting rules.
    fn start(target: &str) -> Prometheus {
        require_tool(PROMETHEUS);
        let dir = TempDir::new("prometheus");
        let config = dir.0.join("prometheus.yml");
        let rules = repo_file("dist/prometheus/kad-rules.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: kad\n    static_configs:\n      - targets: ['{target}']\n",
                rules.display()
            ),
        )
        .expect("write prometheus.yml");
        let addr = free_port();
        let log = fs::File::create(dir.0.join("prometheus.log")).expect("create the log");
        let child = Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.0.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        Prometheus {
            child,
            addr,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(self._dir.0.join("prometheus.log")).unwrap_or_default()
    }

    /// `/api/v1/query` for `expr`, at the current time: the parsed answer, or None when the
    /// server does not answer (yet).
    fn query(&self, expr: &str) -> Option<Value> {
        let mut stream = TcpStream::connect(&self.addr).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .ok()?;
        // HTTP/1.0: the whole body, unchunked, then the server closes.
        write!(
            stream,
            "GET /api/v1/query?query={} HTTP/1.0\r\nHost: {}\r\n\r\n",
            encode(expr),
            self.addr
        )
        .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let (_, body) = response.split_once("\r\n\r\n")?;
        serde_json::from_str(body).ok()
    }

    /// The first sample's value of `expr`, as a number.
    fn value(&self, expr: &str) -> Option<f64> {
        let answer = self.query(expr)?;
        answer["data"]["result"][0]["value"][1]
            .as_str()?
            .parse()
            .ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the pid of the child we started and have not reaped.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        if !wait_for(Duration::from_secs(10), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        }) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Percent-encoding of a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every `targets[].expr` of the dashboard's panels (rows' panels included).
fn dashboard_exprs(dashboard: &Value) -> Vec<String> {
    let mut exprs = Vec::new();
    let mut panels: Vec<&Value> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .collect();
    while let Some(panel) = panels.pop() {
        if let Some(inner) = panel["panels"].as_array() {
            panels.extend(inner);
        }
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(
                target["expr"]
                    .as_str()
                    .expect("a target's expr")
                    .to_string(),
            );
        }
    }
    exprs
}

/// The dashboard's variables made concrete: ranges Prometheus has samples for after a few
/// one-second scrapes, every instance.
fn concrete(expr: &str) -> String {
    let expr = expr
        .replace("$__rate_interval", "30s")
        .replace("$__interval", "5s")
        .replace("$__range", "1m")
        .replace("$instance", ".*");
    assert!(
        !expr.contains('$'),
        "a variable the test does not know: {expr}"
    );
    expr
}

#[test]
fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    let env = kad_env!();
    if !on_the_host() {
        return;
    }
    let dir = TempDir::new("metrics-pods");
    let fifo = dir.0.join("pod-events");
    let status = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(status.success());
    let metrics = free_port();
    // The pod events watcher (connected) and a Docker watcher without a Docker (not), so that
    // both watcher series exist.
    let daemon = Daemon::start_with(
        &env,
        &[
            "--metrics",
            &metrics,
            "--pod-events",
            fifo.to_str().unwrap(),
            "--docker",
            dir.0.join("no-docker.sock").to_str().unwrap(),
        ],
    );
    let cg = TestCgroup::new(&env, "metrics-dash");
    // A process in the cgroup before the policy: setting it refreshes existing connections.
    let (_listener, _) = listen(&env, "127.0.0.1:0", Some(&cg.path));
    daemon.kad_ok(&["set", "--cgroup", &cg.relative(), "--idle", "60"]);
    kad_tests::connect(&env, Some(&cg.path), Some(&cg.path), false);
    // A policy for a cgroup not made yet.
    daemon.kad_ok(&["set", "--cgroup", &format!("{}/later", cg.relative())]);
    let text = scrape(&metrics);
    assert!(
        text.contains("kad_policies_by_state{state=\"waiting\"} 1\n"),
        "{text}"
    );

    let prometheus = Prometheus::start(&metrics);
    assert!(
        wait_for(Duration::from_secs(60), || {
            prometheus
                .value("count_over_time(kad_policies{job=\"kad\"}[1m])")
                .is_some_and(|n| n >= 5.0)
        }),
        "five scrapes of kad in a minute; prometheus log:\n{}",
        prometheus.log()
    );
    // What the series say is what kad holds.
    assert_eq!(prometheus.value("up{job=\"kad\"}"), Some(1.0));
    assert_eq!(prometheus.value("kad_policies"), Some(2.0));
    assert_eq!(
        prometheus.value("kad_policies_by_state{state=\"in_force\"}"),
        Some(1.0)
    );
    assert_eq!(
        prometheus.value("kad_watcher_connected{watcher=\"pod_events\"}"),
        Some(1.0)
    );
    assert_eq!(
        prometheus.value("kad_watcher_connected{watcher=\"docker\"}"),
        Some(0.0)
    );
    assert_eq!(
        prometheus.value(&format!(
            "kad_connections_configured_total{{cgroup=\"{}\",side=\"connect\"}}",
            cg.path.display()
        )),
        Some(1.0)
    );
    if kad_tests::require_kernel(5, 15, "iter/tcp bpf_setsockopt (existing connections)") {
        assert!(
            prometheus
                .value("kad_refresh_duration_seconds_count")
                .is_some_and(|n| n >= 1.0),
            "the refresh at kad set was timed"
        );
    }
    assert_eq!(
        prometheus.value(&format!(
            "kad_build_info{{version=\"{}\"}}",
            kad_tests::VERSION
        )),
        Some(1.0)
    );

    let dashboard: Value = serde_json::from_str(
        &fs::read_to_string(repo_file("dist/grafana/kad-dashboard.json"))
            .expect("read the dashboard"),
    )
    .expect("the dashboard is JSON");
    let exprs = dashboard_exprs(&dashboard);
    assert!(exprs.len() >= 10, "{exprs:?}");
    let mut failed = Vec::new();
    for expr in &exprs {
        let expr = concrete(expr);
        match prometheus.query(&expr) {
            Some(answer)
                if answer["status"] == "success"
                    && answer["data"]["result"]
                        .as_array()
                        .is_some_and(|r| !r.is_empty()) => {}
            answer => failed.push(format!("{expr}\n  -> {answer:?}")),
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} dashboard queries returned no data:\n{}",
        failed.len(),
        exprs.len(),
        failed.join("\n")
    );
    // The rules load in a real Prometheus too, and none fires against a healthy kad except
    // the Docker watcher's, which is disconnected (its `for` has not passed: pending).
    let rules = prometheus.query("ALERTS").expect("ALERTS");
    for alert in rules["data"]["result"].as_array().into_iter().flatten() {
        assert_eq!(
            alert["metric"]["alertname"], "KadWatcherDisconnected",
            "{alert}"
        );
    }
}

#[test]
fn per_policy_series_stop_at_the_cap_and_the_counts_by_state_do_not() {
    let env = kad_env!();
    if !on_the_host() {
        return;
    }
    let metrics = free_port();
    let daemon = Daemon::start_with(&env, &["--metrics", &metrics, "--metrics-policies", "1"]);
    let cg = TestCgroup::new(&env, "metrics-cap");
    daemon.kad_ok(&["set", "--cgroup", &cg.relative()]);
    for waiting in ["a", "b"] {
        daemon.kad_ok(&["set", "--cgroup", &format!("{}/{waiting}", cg.relative())]);
    }
    let text = scrape(&metrics);
    let series = |name: &str| {
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .count()
    };
    assert_eq!(series("kad_policy_in_force"), 1, "{text}");
    assert!(
        text.contains(&format!(
            "kad_policy_in_force{{cgroup=\"{}\",state=\"in_force\"}} 1\n",
            cg.path.display()
        )),
        "{text}"
    );
    assert_eq!(series("kad_keepalive_kills_total"), 1, "{text}");
    for line in [
        "kad_policy_series_omitted 2\n",
        "kad_policies 3\n",
        "kad_policies_by_state{state=\"in_force\"} 1\n",
        "kad_policies_by_state{state=\"waiting\"} 2\n",
        "kad_policies_by_state{state=\"failed\"} 0\n",
    ] {
        assert!(text.contains(line), "{line:?} in:\n{text}");
    }
    // Once the cgroup is made, its policy is in force: the counts follow.
    fs::create_dir(cg.path.join("a")).expect("mkdir a");
    assert!(
        wait_for(Duration::from_secs(5), || scrape(&metrics)
            .contains("kad_policies_by_state{state=\"in_force\"} 2\n")),
        "{}",
        scrape(&metrics)
    );
}
