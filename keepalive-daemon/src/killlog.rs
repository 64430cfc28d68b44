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

impl log::Log for KillLog {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        let mut w = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if w.start.is_none_or(|s| now.duration_since(s) >= PERIOD) {
            w.start = Some(now);
            w.logged = 0;
        }
        if w.logged >= BURST {
            w.held += 1;
            return;
        }
        w.logged += 1;
        let held = std::mem::take(&mut w.held);
        if held > 0 {
            info!("{} ({held} more not logged)", record.args());
        } else {
            info!("{}", record.args());
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
