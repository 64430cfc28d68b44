//! Refreshes of existing connections (the iter/tcp program run in each network namespace of a
//! policy's processes), timed where they run: their durations and failures, for `/metrics`.
//!
//! Process-wide, as the refreshes are: the state thread records, the scrapes read.
use std::{sync::LazyLock, time::Duration};

use prometheus_client::metrics::{
    counter::Counter,
    histogram::{exponential_buckets, Histogram},
};

/// What the refreshes took and how many failed.
pub struct RefreshMetrics {
    /// Seconds per refresh: 1 ms to about 16 s, doubling.
    pub duration: Histogram,
    /// Refreshes the kernel refused (the error is logged).
    pub failures: Counter,
}

pub static REFRESHES: LazyLock<RefreshMetrics> = LazyLock::new(|| RefreshMetrics {
    duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
    failures: Counter::default(),
});

/// Records one refresh that took `took`; `ok` is false when it failed.
pub fn record(took: Duration, ok: bool) {
    REFRESHES.duration.observe(took.as_secs_f64());
    if !ok {
        REFRESHES.failures.inc();
    }
}
