//! The control socket: bound with mode 0666 (anyone may read), served within limits so that no
//! local user can take it from root: root has a socket of its own (mode 0600), served first,
//! so that its connections never queue behind others'; the others' accepts are paced;
//! connections are counted per peer uid, root has slots of its own and waits for one rather
//! than being refused (`slots`), accept errors back off, repeated log lines are held back, and read
//! replies are computed once for all the clients waiting for them (`connection`).
//!
//! The daemon hands [`serve`] its request handler; nothing here knows the daemon's state.
use std::{
    future::Future,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::net::{UnixListener, UnixStream};
use tracing::warn;

use crate::{
    api::protocol::{self, Peer, Request, Response},
    host::logging::{held_note, LogLimiter},
    host::pathio::{io_err, PathIoError},
};

mod connection;
mod slots;

use connection::Shared;
use slots::{Admission, Slot, SlotTable};

/// After a failed accept (EMFILE, ENFILE, ENOMEM): the connection stays queued, so retrying
/// at once would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Log lines a flood may cause: this many per period, then a count.
const LOG_PERIOD: Duration = Duration::from_secs(10);
const LOG_BURST: u32 = 5;

/// Why the control socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("another kad daemon is already serving {0}")]
    SocketInUse(PathBuf),
    #[error(transparent)]
    Io(#[from] PathIoError),
}

/// How many connections are served at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Per non-root peer uid.
    pub per_uid: usize,
    /// All non-root peers together.
    pub unprivileged: usize,
    /// Root's own, which no other user's connections take.
    pub root: usize,
    /// Root's connections waiting for one of its slots (beyond them, refused).
    pub root_queue: usize,
}

/// A few hundred fds at most; root keeps its slots whatever the others do.
pub const LIMITS: Limits = Limits {
    per_uid: 32,
    unprivileged: 128,
    root: 64,
    root_queue: 1024,
};

/// The control socket, open to everyone, and root's own next to it.
pub struct Listeners {
    pub all: UnixListener,
    pub root: UnixListener,
}

/// Binds the control socket, replacing a stale one but never a live daemon's, and root's.
pub fn bind(path: &Path) -> Result<Listeners, BindError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io_err("cannot create", parent))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(BindError::SocketInUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(io_err("cannot remove stale socket", path))?;
    }
    // Root's first: a client finding the socket open finds root's too.
    let root_path = protocol::root_socket(path);
    match std::fs::remove_file(&root_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(io_err("cannot remove stale socket", &root_path)(e).into())
        }
        _ => {}
    }
    let root = UnixListener::bind(&root_path).map_err(io_err("cannot bind", &root_path))?;
    std::fs::set_permissions(&root_path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err("cannot set permissions on", &root_path))?;
    let all = UnixListener::bind(path)
        .map_err(io_err("cannot bind", path))
        .and_then(|all| {
            // Anyone may list and ask for status; changes are checked against the peer's uid.
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
                .map_err(io_err("cannot set permissions on", path))?;
            Ok(all)
        });
    match all {
        Ok(all) => Ok(Listeners { all, root }),
        Err(e) => {
            let _ = std::fs::remove_file(&root_path);
            Err(e.into())
        }
    }
}

/// Non-root connections accepted per second at most, and the burst: beyond them, the others'
/// connections wait in the kernel's queue (their `connect` blocks once it is full), so a
/// flood costs the daemon little and leaves the CPU to root's clients.
const UNPRIVILEGED_ACCEPTS_PER_SECOND: f64 = 1000.0;
const UNPRIVILEGED_ACCEPT_BURST: f64 = 64.0;

/// Serves the control socket for ever, answering each request with `handle(request, peer)`:
/// the peer's uid and its process in our PID namespace (the kernel translates it), if known.
/// Root's socket is served first, and never paced.
pub async fn serve<F, Fut>(listeners: Listeners, limits: Limits, handle: F)
where
    F: Fn(Request, Peer) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response> + Send + 'static,
{
    let shared = Arc::new(Shared::new(handle));
    let slots = SlotTable::new(limits);
    let mut accept_log = LogLimiter::new(LOG_PERIOD, LOG_BURST);
    let mut over_log = LogLimiter::new(LOG_PERIOD, LOG_BURST);
    let mut pace = Pace::new(UNPRIVILEGED_ACCEPTS_PER_SECOND, UNPRIVILEGED_ACCEPT_BURST);
    loop {
        let accepted = tokio::select! {
            biased;
            accepted = listeners.root.accept() => accepted,
            accepted = async {
                pace.ready().await;
                listeners.all.accept().await
            } => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                // Unknown credentials count as an unprivileged user of their own.
                let cred = stream.peer_cred().ok();
                let uid = cred.map(|c| c.uid()).unwrap_or(u32::MAX);
                let pid = cred
                    .and_then(|c| c.pid())
                    .and_then(|p| u32::try_from(p).ok());
                if uid != 0 {
                    pace.take();
                }
                match Slot::take(&slots, uid) {
                    Admission::Now(slot) => {
                        let shared = Arc::clone(&shared);
                        tokio::spawn(async move { shared.serve(stream, uid, pid, slot).await });
                    }
                    Admission::Queued(turn) => {
                        let shared = Arc::clone(&shared);
                        tokio::spawn(async move {
                            let slot = turn.wait().await;
                            shared.serve(stream, uid, pid, slot).await
                        });
                    }
                    Admission::Refused(message) => {
                        if let Some(held) = over_log.allow() {
                            warn!("connection refused: {message}{}", held_note(held));
                        }
                        refuse(stream, &message);
                    }
                }
            }
            Err(e) => {
                if let Some(held) = accept_log.allow() {
                    warn!(
                        "accept on the control socket failed: {e}; retrying in {} ms{}",
                        ACCEPT_BACKOFF.as_millis(),
                        held_note(held)
                    );
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// A token bucket of accepts.
struct Pace {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Pace {
    fn new(rate: f64, burst: f64) -> Pace {
        Pace {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
    }

    /// Waits until an accept may be taken.
    async fn ready(&mut self) {
        self.refill();
        if self.tokens < 1.0 {
            tokio::time::sleep(Duration::from_secs_f64((1.0 - self.tokens) / self.rate)).await;
        }
    }

    fn take(&mut self) {
        self.refill();
        self.tokens -= 1.0;
    }
}

/// Over its limit: a one-line error at once, without waiting for the request or the reader.
/// What the client sent is left unread: the reply stays queued for it all the same.
fn refuse(stream: UnixStream, message: &str) {
    let _ = stream.try_write(&protocol::encode(&Response::error(message)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Real unix sockets, a real runtime: many readers at once share few computations, and
    /// each reply was computed after its request arrived.
    #[test]
    fn concurrent_reads_share_computations() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = std::env::temp_dir().join(format!("kad-server-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let computed = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&computed);
        let replies = runtime.block_on(async {
            let listeners = bind(&path).unwrap();
            tokio::spawn(serve(listeners, LIMITS, move |_, _| {
                let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                async move {
                    // Slow enough that the clients pile up behind it.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Response::Reloaded { policies: n }
                }
            }));
            let mut clients = Vec::new();
            for _ in 0..30 {
                let path = path.clone();
                clients.push(tokio::spawn(async move {
                    let mut s = UnixStream::connect(&path).await.unwrap();
                    s.write_all(&protocol::encode(&Request::Status))
                        .await
                        .unwrap();
                    let mut reply = String::new();
                    s.read_to_string(&mut reply).await.unwrap();
                    reply
                }));
            }
            let mut replies = Vec::new();
            for c in clients {
                replies.push(c.await.unwrap());
            }
            replies
        });
        let _ = std::fs::remove_dir_all(&dir);
        let n = computed.load(Ordering::SeqCst);
        assert!(
            replies.iter().all(|r| r.contains("\"reloaded\"")),
            "{replies:?}"
        );
        assert!((1..=3).contains(&n), "30 readers at once, {n} computations");
    }
}
