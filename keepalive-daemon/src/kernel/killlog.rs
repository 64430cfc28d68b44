//! The events the kernel sends (through aya-log) when keepalive gives up on a connection:
//! logged at info level, at most a few per period, with a count of those held back.
use std::{sync::Mutex, time::Duration};

use aya_log::EbpfLogger;
use tokio::io::{unix::AsyncFd, Interest};
use tracing::{error, info};

use crate::host::logging::LogLimiter;

/// Events logged per period; more are counted and said with the next one logged.
const BURST: u32 = 10;
const PERIOD: Duration = Duration::from_secs(10);

pub struct KillLog {
    limiter: Mutex<LogLimiter>,
}

impl Default for KillLog {
    fn default() -> Self {
        KillLog {
            limiter: Mutex::new(LogLimiter::new(PERIOD, BURST)),
        }
    }
}

impl log::Log for KillLog {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        let admitted = self
            .limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .allow();
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
    use std::time::Instant;

    use super::*;

    #[test]
    fn a_burst_is_logged_then_held_back_and_counted_with_the_next_period() {
        let log = KillLog::default();
        let mut w = log.limiter.lock().unwrap();
        let t0 = Instant::now();
        let first: Vec<Option<u64>> = (0..25)
            .map(|i| w.allow_at(t0 + Duration::from_millis(i)))
            .collect();
        assert_eq!(first[..10], [Some(0); 10]);
        assert_eq!(first[10..], [None; 15]);
        // Still the same period: held back.
        assert_eq!(w.allow_at(t0 + PERIOD - Duration::from_millis(1)), None);
        // The next period: logged, saying how many were not.
        assert_eq!(w.allow_at(t0 + PERIOD), Some(16));
        assert_eq!(w.allow_at(t0 + PERIOD + Duration::from_millis(1)), Some(0));
    }
}
