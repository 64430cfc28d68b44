//! Prometheus metrics at `/metrics`: what is exposed ([`exposition`]: the families, their labels
//! and the bound on per-policy series), the refreshes timed as they happen ([`refresh`]), and
//! the HTTP/1 endpoint that serves them ([`http`]: hyper, with bounded connections, timeouts
//! and request size).
pub mod exposition;
pub mod http;
pub mod refresh;

pub use exposition::{render, Exposition, PolicyState, PolicyView, Watcher};
pub use http::{serve, Limits, LIMITS};

/// Per-policy series served by default: past this many policies, only the bounded families
/// are (see `--metrics-policies`).
pub const DEFAULT_POLICY_SERIES: usize = 1000;
