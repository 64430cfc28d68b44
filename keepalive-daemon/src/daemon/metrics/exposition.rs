//! The families served at `/metrics`, encoded by `prometheus-client` in the Prometheus text
//! format (0.0.4), built afresh from the state thread's snapshot at each scrape.
//!
//! Label cardinality: every family is bounded (a fixed set of label values) except the
//! per-policy ones, labelled with the policy's cgroup path. A container's id is part of its
//! cgroup path, so those make new series for each container; they are served for the first
//! `per_policy` policies in path order only (`--metrics-policies`), and
//! `kad_policy_series_omitted` counts the rest. `kad_policies_by_state` and the watcher,
//! refresh and build families stay bounded whatever the number of policies.
use prometheus_client::{
    collector::Collector,
    encoding::{prometheus_text, DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::ConstCounter,
        family::Family,
        gauge::{ConstGauge, Gauge},
        info::Info,
        MetricType,
    },
    registry::Registry,
};

use super::refresh::REFRESHES;
use crate::api::protocol::StatsEntry;

/// Why a policy is, or is not, in force: the `state` label's values, a fixed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyState {
    /// Its cgroup exists and the kernel holds the policy.
    InForce,
    /// No cgroup at its path yet: the kernel gives the policy to the cgroup when it is made.
    Waiting,
    /// Set for a container that is stopped: kept, in force again when it starts.
    ContainerStopped,
    /// Refused: kad already holds as many policies as its maps take.
    TooManyPolicies,
    /// Applying it failed for another reason (`kad status` says which).
    Failed,
}

impl PolicyState {
    pub const ALL: [PolicyState; 5] = [
        PolicyState::InForce,
        PolicyState::Waiting,
        PolicyState::ContainerStopped,
        PolicyState::TooManyPolicies,
        PolicyState::Failed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            PolicyState::InForce => "in_force",
            PolicyState::Waiting => "waiting",
            PolicyState::ContainerStopped => "container_stopped",
            PolicyState::TooManyPolicies => "too_many_policies",
            PolicyState::Failed => "failed",
        }
    }
}

/// One policy as `/metrics` shows it.
#[derive(Debug, Clone)]
pub struct PolicyView {
    pub cgroup: String,
    pub state: PolicyState,
    /// Its counters, while its cgroup exists.
    pub counters: Option<StatsEntry>,
}

/// A watcher of pods or containers the daemon runs, and whether it is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watcher {
    /// `kubernetes`, `pod_events` or `docker`.
    pub name: &'static str,
    pub connected: bool,
}

/// What one scrape shows.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    /// How many policies are in each state (all of them, not only those in `per_policy`).
    pub by_state: Vec<(PolicyState, usize)>,
    /// The policies given series of their own, in path order: at most the cap.
    pub per_policy: Vec<PolicyView>,
    /// Policies past the cap, without series of their own.
    pub omitted: usize,
    pub attachments: usize,
    pub watchers: Vec<Watcher>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct WatcherLabel {
    watcher: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

fn gauge(value: usize) -> Gauge {
    let gauge = Gauge::default();
    gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
    gauge
}

/// The per-policy families, encoded straight from the views at each scrape (a family per
/// metric would hash and copy every label set first: several times slower at 10,000 policies).
#[derive(Debug)]
struct PerPolicy(Vec<PolicyView>);

/// The per-policy counters: name (the encoder adds `_total`), help, value.
type CounterFamily = (&'static str, &'static str, fn(&StatsEntry) -> u64);

const COUNTERS: [CounterFamily; 4] = [
    (
        "kad_setsockopt_failures",
        "bpf_setsockopt calls the kernel refused, by policy cgroup.",
        |c| c.setsockopt_failures,
    ),
    (
        "kad_keepalive_kills",
        "Connections closed because keepalive found the peer dead, by policy cgroup.",
        |c| c.keepalive_kills,
    ),
    (
        "kad_existing_connections_updated",
        "Connections that existed before a policy and were given it, by policy cgroup.",
        |c| c.refreshed,
    ),
    (
        "kad_overridden",
        "Connections on which a program set a keepalive option to another value than the \
         policy's, once each (rewritten under --enforce), by policy cgroup.",
        |c| c.overridden,
    ),
];

impl Collector for PerPolicy {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let with_counters = || {
            self.0
                .iter()
                .filter_map(|p| Some((p.cgroup.as_str(), p.counters.as_ref()?)))
        };
        if with_counters().next().is_some() {
            let mut family = encoder.encode_descriptor(
                "kad_connections_configured",
                "TCP connections that kad gave keepalive, by policy cgroup and side.",
                None,
                MetricType::Counter,
            )?;
            for (cgroup, c) in with_counters() {
                for (side, n) in [("connect", c.connect), ("accept", c.accept)] {
                    let labels = [("cgroup", cgroup), ("side", side)];
                    ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
                }
            }
            for (name, help, value) in COUNTERS {
                let mut family =
                    encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
                for (cgroup, c) in with_counters() {
                    ConstCounter::new(value(c))
                        .encode(family.encode_family(&[("cgroup", cgroup)])?)?;
                }
            }
        }
        if !self.0.is_empty() {
            let mut family = encoder.encode_descriptor(
                "kad_policy_in_force",
                "1 when the policy of this cgroup is in force, else 0; state says why not \
                 (waiting, container_stopped, too_many_policies, failed).",
                None,
                MetricType::Gauge,
            )?;
            for p in &self.0 {
                let labels = [("cgroup", p.cgroup.as_str()), ("state", p.state.label())];
                ConstGauge::new(i64::from(p.state == PolicyState::InForce))
                    .encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// The exposition, in the Prometheus text format.
pub fn render(x: Exposition) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(PerPolicy(x.per_policy)));
    registry.register(
        "kad_policy_series_omitted",
        "Policies without per-policy series, past the --metrics-policies cap",
        gauge(x.omitted),
    );
    let by_state = Family::<StateLabel, Gauge>::default();
    for state in PolicyState::ALL {
        let n: usize = x
            .by_state
            .iter()
            .filter(|(s, _)| *s == state)
            .map(|(_, n)| n)
            .sum();
        by_state
            .get_or_create(&StateLabel {
                state: state.label(),
            })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    registry.register(
        "kad_policies_by_state",
        "Policies by state: in_force, waiting, container_stopped, too_many_policies, failed",
        by_state,
    );
    let total: usize = x.by_state.iter().map(|(_, n)| n).sum();
    registry.register(
        "kad_policies",
        "Policies in the table (set with kad set or from the config file)",
        gauge(total),
    );
    registry.register(
        "kad_attachments",
        "Anchor cgroups with kad's programs attached",
        gauge(x.attachments),
    );
    let watchers = Family::<WatcherLabel, Gauge>::default();
    for w in &x.watchers {
        watchers
            .get_or_create(&WatcherLabel { watcher: w.name })
            .set(i64::from(w.connected));
    }
    registry.register(
        "kad_watcher_connected",
        "1 while the watcher (kubernetes, pod_events, docker) is connected, else 0; only the \
         watchers the daemon runs",
        watchers,
    );
    registry.register(
        "kad_refresh_duration_seconds",
        "How long giving existing connections their policy took (one iter/tcp run per network \
         namespace of the policy's processes)",
        REFRESHES.duration.clone(),
    );
    registry.register(
        "kad_refresh_failures",
        "Refreshes of existing connections that failed (the error is logged)",
        REFRESHES.failures.clone(),
    );
    // `_info` is added by the encoder.
    registry.register(
        "kad_build",
        "The running kad's version",
        Info::new(VersionLabel {
            version: env!("CARGO_PKG_VERSION"),
        }),
    );
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_text::encode(&mut out, &registry);
    out
}

/// The content type of what [`render`] makes.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(cgroup: &str) -> StatsEntry {
        StatsEntry {
            cgroup: cgroup.into(),
            connect: 3,
            accept: 2,
            setsockopt_failures: 0,
            keepalive_kills: 1,
            refreshed: 4,
            overridden: 5,
        }
    }

    #[test]
    fn renders_counters_with_cgroup_labels() {
        let cgroup = "/sys/fs/cgroup/a \"b\"";
        let text = render(Exposition {
            by_state: vec![(PolicyState::InForce, 1)],
            per_policy: vec![PolicyView {
                cgroup: cgroup.into(),
                state: PolicyState::InForce,
                counters: Some(stats(cgroup)),
            }],
            attachments: 1,
            ..Exposition::default()
        });
        let label = "cgroup=\"/sys/fs/cgroup/a \\\"b\\\"\"";
        for line in [
            format!("kad_overridden_total{{{label}}} 5\n"),
            "# TYPE kad_connections_configured_total counter\n".to_string(),
            format!("kad_connections_configured_total{{{label},side=\"connect\"}} 3\n"),
            format!("kad_connections_configured_total{{{label},side=\"accept\"}} 2\n"),
            format!("kad_keepalive_kills_total{{{label}}} 1\n"),
            format!("kad_existing_connections_updated_total{{{label}}} 4\n"),
            format!("kad_setsockopt_failures_total{{{label}}} 0\n"),
            format!("kad_policy_in_force{{{label},state=\"in_force\"}} 1\n"),
            "kad_policies 1\n".to_string(),
            "kad_attachments 1\n".to_string(),
            "kad_policies_by_state{state=\"in_force\"} 1\n".to_string(),
            "kad_policies_by_state{state=\"too_many_policies\"} 0\n".to_string(),
            "kad_policy_series_omitted 0\n".to_string(),
            "# TYPE kad_refresh_duration_seconds histogram\n".to_string(),
            "# TYPE kad_refresh_failures_total counter\n".to_string(),
            format!(
                "kad_build_info{{version=\"{}\"}} 1\n",
                env!("CARGO_PKG_VERSION")
            ),
        ] {
            assert!(text.contains(&line), "{line:?} in:\n{text}");
        }
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.split(' ').count() >= 2, "{line}");
        }
    }

    #[test]
    fn a_policy_not_in_force_says_why_and_watchers_their_state() {
        let text = render(Exposition {
            by_state: vec![(PolicyState::Waiting, 2), (PolicyState::TooManyPolicies, 3)],
            per_policy: vec![PolicyView {
                cgroup: "/cg/w".into(),
                state: PolicyState::Waiting,
                counters: None,
            }],
            omitted: 4,
            attachments: 0,
            watchers: vec![
                Watcher {
                    name: "kubernetes",
                    connected: false,
                },
                Watcher {
                    name: "docker",
                    connected: true,
                },
            ],
        });
        for line in [
            "kad_policy_in_force{cgroup=\"/cg/w\",state=\"waiting\"} 0\n",
            "kad_policies_by_state{state=\"waiting\"} 2\n",
            "kad_policies_by_state{state=\"too_many_policies\"} 3\n",
            "kad_policies_by_state{state=\"in_force\"} 0\n",
            "kad_policies 5\n",
            "kad_policy_series_omitted 4\n",
            "kad_watcher_connected{watcher=\"kubernetes\"} 0\n",
            "kad_watcher_connected{watcher=\"docker\"} 1\n",
        ] {
            assert!(text.contains(line), "{line:?} in:\n{text}");
        }
        // A policy without counters (no cgroup) has no counter series.
        assert!(!text.contains("kad_keepalive_kills_total{"), "{text}");
    }
}
