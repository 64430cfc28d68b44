//! The daemon's log: one event is one line whatever text it carries, and repeated messages
//! are held back so that nobody can fill the disk with them.
use std::{
    io::{self, Write},
    time::{Duration, Instant},
};

use tracing_subscriber::fmt::MakeWriter;

/// Text from users (requests, paths, commands) made safe for one log line: control characters
/// (newlines above all, which would start a forged line) and backslashes are escaped.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c == '\\' || c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Starts the daemon's log on stderr (the journal under systemd), at `RUST_LOG` or `info`.
/// When stderr is the journal, each line starts with its priority (see [`Stderr`]).
pub fn init() {
    tracing_subscriber::fmt()
        // No colours: the writer escapes every control character, ESC included.
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // kube-rs logs each failed attempt of the pod watcher at error level; the
                // daemon says it once per change, with the cause.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube_client=off")),
        )
        .with_writer(Stderr {
            journal: stderr_is_journal(),
        })
        .init();
}

/// Makes each event's writer. When stderr is the journal, the line starts with the event's
/// syslog priority, `<3>` (error) to `<7>` (debug), which journald keeps as the entry's
/// PRIORITY instead of the stream's default (info): `journalctl -p warning` then shows the
/// warnings and errors only (sd-daemon(3)).
struct Stderr {
    journal: bool,
}

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = OneLine;

    fn make_writer(&'a self) -> OneLine {
        OneLine { prefix: "" }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> OneLine {
        OneLine {
            prefix: if self.journal {
                priority(*meta.level())
            } else {
                ""
            },
        }
    }
}

/// sd-daemon(3)'s prefix for a level.
fn priority(level: tracing::Level) -> &'static str {
    match level {
        tracing::Level::ERROR => "<3>",
        tracing::Level::WARN => "<4>",
        tracing::Level::INFO => "<6>",
        tracing::Level::DEBUG | tracing::Level::TRACE => "<7>",
    }
}

/// Whether stderr is the stream systemd connected to the journal: `JOURNAL_STREAM` holds its
/// "device:inode" (systemd.exec(5)); a stderr redirected elsewhere by a child of the service
/// does not match.
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    stream == format!("{}:{}", meta.dev(), meta.ino())
}

/// Writes each event to stderr with every control character escaped but its final newline,
/// so that no text logged anywhere (escaped at its call site or not) can start a line.
struct OneLine {
    /// Written before the line: its priority for the journal, or nothing.
    prefix: &'static str,
}

impl Write for OneLine {
    /// tracing's formatter hands over a whole event in one `write_all`, which lands here once.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut line = self.prefix.as_bytes().to_vec();
        line.extend(one_line(buf));
        io::stderr().lock().write_all(&line)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// `event` with its control characters (C0 and C1) escaped, ending in exactly one newline.
fn one_line(event: &[u8]) -> Vec<u8> {
    let body = event.strip_suffix(b"\n").unwrap_or(event);
    let mut line = String::with_capacity(event.len() + 1);
    for c in String::from_utf8_lossy(body).chars() {
        if c.is_control() {
            line.extend(c.escape_default());
        } else {
            line.push(c);
        }
    }
    line.push('\n');
    line.into_bytes()
}

/// Lets through at most `burst` messages per `period` and counts those it holds back, for
/// messages that a client or a fault can repeat without end.
#[derive(Debug)]
pub struct LogLimiter {
    period: Duration,
    burst: u32,
    window: Option<Instant>,
    sent: u32,
    held: u64,
}

impl LogLimiter {
    pub const fn new(period: Duration, burst: u32) -> Self {
        LogLimiter {
            period,
            burst,
            window: None,
            sent: 0,
            held: 0,
        }
    }

    /// `Some(n)` when a message may be logged now, `n` being how many were held back since
    /// the last one that was; `None` when this one is to be held back.
    pub fn allow(&mut self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    /// `allow` for a message at `now`.
    pub fn allow_at(&mut self, now: Instant) -> Option<u64> {
        if self
            .window
            .is_none_or(|start| now.duration_since(start) >= self.period)
        {
            self.window = Some(now);
            self.sent = 0;
        }
        if self.sent >= self.burst {
            self.held += 1;
            return None;
        }
        self.sent += 1;
        Some(std::mem::take(&mut self.held))
    }
}

/// " (N similar messages not logged)" after a message that follows held-back ones.
pub fn held_note(held: u64) -> String {
    if held == 0 {
        String::new()
    } else {
        format!(" ({held} similar messages not logged)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_leaves_one_line() {
        let forged = "x\n2026-01-01T00:00:00Z  INFO policy removed\r\u{1b}[2K\\n";
        let escaped = escape(forged);
        assert!(!escaped.chars().any(|c| c.is_control()), "{escaped}");
        assert_eq!(
            escaped,
            "x\\n2026-01-01T00:00:00Z  INFO policy removed\\r\\u{1b}[2K\\\\n"
        );
        assert_eq!(escape("/sys/fs/cgroup/app é"), "/sys/fs/cgroup/app é");
    }

    #[test]
    fn an_event_is_written_as_one_line() {
        assert_eq!(one_line(b"a INFO x\n"), b"a INFO x\n");
        assert_eq!(
            one_line(b"a WARN refused: x\n2026 INFO forged\n"),
            b"a WARN refused: x\\n2026 INFO forged\n"
        );
        assert_eq!(one_line(b"no newline"), b"no newline\n");
        assert_eq!(
            one_line("\u{9b}2J \u{1b}[2J é\n".as_bytes()),
            "\\u{9b}2J \\u{1b}[2J é\n".as_bytes()
        );
    }

    #[test]
    fn priorities_for_the_journal() {
        assert_eq!(priority(tracing::Level::ERROR), "<3>");
        assert_eq!(priority(tracing::Level::WARN), "<4>");
        assert_eq!(priority(tracing::Level::INFO), "<6>");
        assert_eq!(priority(tracing::Level::DEBUG), "<7>");
        // A test's stderr is not the journal, whatever the environment says.
        std::env::set_var("JOURNAL_STREAM", "1:1");
        assert!(!stderr_is_journal());
    }

    #[test]
    fn limiter_holds_back_a_flood_and_counts_it() {
        let mut limiter = LogLimiter::new(Duration::from_millis(200), 3);
        let allowed: Vec<Option<u64>> = (0..10).map(|_| limiter.allow()).collect();
        assert_eq!(&allowed[..3], &[Some(0), Some(0), Some(0)]);
        assert!(allowed[3..].iter().all(Option::is_none));
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(
            limiter.allow(),
            Some(7),
            "the next window says what was held"
        );
        assert_eq!(limiter.allow(), Some(0));
        assert_eq!(held_note(7), " (7 similar messages not logged)");
        assert_eq!(held_note(0), "");
    }
}
