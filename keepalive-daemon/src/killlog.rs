//! The events the kernel sends (through aya-log) when keepalive gives up on a connection:
//! logged at info level, at most a few per period, with a count of those held back.
use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use aya_log::EbpfLogger;
use tokio::io::{unix::AsyncFd, Interest};
use tracing::{error, info};

/// Events logged per period; more are counted and said with the next one logged.
const BURST: u32 = 10;
const PERIOD: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct KillLog {
    state: Mutex<Window>,
}

#[derive(Default)]
struct Window {
    start: Option<Instant>,
    logged: u32,
    held: u64,
}

impl Window {
    /// Whether an event at `now` is logged: `Some(n)` with the number held back since the last
    /// one logged, or `None` (held back, counted).
    fn admit(&mut self, now: Instant) -> Option<u64> {
        if self.start.is_none_or(|s| now.duration_since(s) >= PERIOD) {
            self.start = Some(now);
            self.logged = 0;
        }
        if self.logged >= BURST {
            self.held += 1;
            return None;
        }
        self.logged += 1;
        Some(std::mem::take(&mut self.held))
    }
}

impl log::Log for KillLog {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        let admitted = self
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(Instant::now());
        match admitted {
            None => {}
            Some(0) => info!("{}", record.args()),
            Some(held) => info!("{} ({held} more not logged)", record.args()),
        }
    }

    fn flush(&self) {}
}

/// Reads the kernel's kill events for as long as the daemon runs.
pub fn spawn(logger: EbpfLogger<KillLog>) {
    // SAFETY: the logger owns its ring buffer's descriptor for as long as the AsyncFd lives.
    let fd = match unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            error!(
                "keepalive kill events will not be logged: {}",
                e.into_parts().1
            );
            return;
        }
    };
    tokio::spawn(async move {
        let mut fd = fd;
        loop {
            match fd.readable_mut().await {
                Ok(mut guard) => {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                Err(e) => {
                    error!("keepalive kill events: {e}");
                    break;
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_logged_then_held_back_and_counted_with_the_next_period() {
        let mut w = Window::default();
        let t0 = Instant::now();
        let first: Vec<Option<u64>> = (0..25)
            .map(|i| w.admit(t0 + Duration::from_millis(i)))
            .collect();
        assert_eq!(first[..10], [Some(0); 10]);
        assert_eq!(first[10..], [None; 15]);
        // Still the same period: held back.
        assert_eq!(w.admit(t0 + PERIOD - Duration::from_millis(1)), None);
        // The next period: logged, saying how many were not.
        assert_eq!(w.admit(t0 + PERIOD), Some(16));
        assert_eq!(w.admit(t0 + PERIOD + Duration::from_millis(1)), Some(0));
    }
}
