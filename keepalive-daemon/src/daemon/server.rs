//! The control socket: bound with mode 0666 (anyone may read), served within limits so that no
//! local user can take it from root: connections are counted per peer uid, root has slots of
//! its own, accept errors back off, repeated log lines are held back, and read replies are
//! computed once for all the clients waiting for them.
use std::{
    collections::HashMap,
    future::Future,
    os::unix::fs::PermissionsExt,
    path::Path,
    sync::{Arc, Mutex as StdMutex, Weak},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{unix::OwnedReadHalf, UnixListener, UnixStream},
    sync::Mutex,
};
use tracing::warn;

use crate::{
    api::protocol::{self, Request, Response, MAX_REQUEST_BYTES},
    daemon::DaemonError,
    host::logging::{escape, held_note, LogLimiter},
    host::pathio::io_err,
};

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to read its reply (a status of thousands of policies is MBs).
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// What is read and thrown away after replying to a request that was not read whole.
const DRAIN_LIMIT: u64 = 16 << 20;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// After a failed accept (EMFILE, ENFILE, ENOMEM): the connection stays queued, so retrying
/// at once would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Log lines a flood may cause: this many per period, then a count.
const LOG_PERIOD: Duration = Duration::from_secs(10);
const LOG_BURST: u32 = 5;

/// How many connections are served at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Per non-root peer uid.
    pub per_uid: usize,
    /// All non-root peers together.
    pub unprivileged: usize,
    /// Root's own, which no other user's connections take.
    pub root: usize,
}

/// A few hundred fds at most; root keeps its slots whatever the others do.
pub const LIMITS: Limits = Limits {
    per_uid: 32,
    unprivileged: 128,
    root: 64,
};

/// Binds the control socket, replacing a stale one but never a live daemon's.
pub fn bind(path: &Path) -> Result<UnixListener, DaemonError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io_err("cannot create", parent))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(DaemonError::SocketInUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(io_err("cannot remove stale socket", path))?;
    }
    let listener = UnixListener::bind(path).map_err(io_err("cannot bind", path))?;
    // Anyone may list and ask for status; changes are checked against the peer's uid.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .map_err(io_err("cannot set permissions on", path))?;
    Ok(listener)
}

/// Serves the control socket for ever, answering each request with `handle(request, pid)`,
/// `pid` being the peer's process in our PID namespace (the kernel translates it), if known.
pub async fn serve<F, Fut>(listener: UnixListener, limits: Limits, handle: F)
where
    F: Fn(Request, Option<u32>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response> + Send,
{
    let shared = Arc::new(Shared {
        handle,
        slots: StdMutex::new(Slots::default()),
        limits,
        replies: Default::default(),
        refused_log: StdMutex::new(LogLimiter::new(LOG_PERIOD, LOG_BURST)),
        unprivileged_bytes: Mutex::new(ByteBudget::new(UNPRIVILEGED_BYTES_PER_SECOND)),
    });
    let mut accept_log = LogLimiter::new(LOG_PERIOD, LOG_BURST);
    let mut over_log = LogLimiter::new(LOG_PERIOD, LOG_BURST);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                // Unknown credentials count as an unprivileged user of their own.
                let cred = stream.peer_cred().ok();
                let uid = cred.map(|c| c.uid()).unwrap_or(u32::MAX);
                let pid = cred
                    .and_then(|c| c.pid())
                    .and_then(|p| u32::try_from(p).ok());
                match Slot::take(&shared, uid) {
                    Ok(slot) => {
                        let shared = Arc::clone(&shared);
                        tokio::spawn(async move { shared.serve(stream, uid, pid, slot).await });
                    }
                    Err(message) => {
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

/// Over its limit: a one-line error at once, without waiting for the request or the reader.
fn refuse(stream: UnixStream, message: &str) {
    // What the client already sent is read first: closing with unread input would reset the
    // connection under the reply.
    let mut buf = [0u8; 4096];
    while matches!(stream.try_read(&mut buf), Ok(n) if n > 0) {}
    let _ = stream.try_write(&protocol::encode(&Response::error(message)));
}

struct Shared<F> {
    handle: F,
    slots: StdMutex<Slots>,
    limits: Limits,
    replies: Replies,
    refused_log: StdMutex<LogLimiter>,
    /// What non-root clients may be sent, together: copying megabytes of status to each of
    /// them is what a flood of readers would cost.
    unprivileged_bytes: Mutex<ByteBudget>,
}

#[derive(Debug, Default)]
struct Slots {
    root: usize,
    unprivileged: usize,
    per_uid: HashMap<u32, usize>,
}

/// A connection being served; gives its slot back when dropped.
struct Slot<F> {
    shared: Arc<Shared<F>>,
    uid: u32,
}

impl<F> Slot<F> {
    fn take(shared: &Arc<Shared<F>>, uid: u32) -> Result<Slot<F>, String> {
        let limits = shared.limits;
        let mut slots = shared.slots.lock().unwrap_or_else(|e| e.into_inner());
        if uid == 0 {
            if slots.root >= limits.root {
                return Err(format!(
                    "too many connections from root (limit {}): try again later",
                    limits.root
                ));
            }
            slots.root += 1;
        } else {
            let mine = slots.per_uid.get(&uid).copied().unwrap_or(0);
            if mine >= limits.per_uid {
                return Err(format!(
                    "too many connections from uid {uid} (limit {}): try again later",
                    limits.per_uid
                ));
            }
            if slots.unprivileged >= limits.unprivileged {
                return Err(format!(
                    "too many connections from non-root users (limit {}): try again later",
                    limits.unprivileged
                ));
            }
            slots.unprivileged += 1;
            *slots.per_uid.entry(uid).or_default() += 1;
        }
        Ok(Slot {
            shared: Arc::clone(shared),
            uid,
        })
    }
}

impl<F> std::fmt::Debug for Slot<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Slot(uid {})", self.uid)
    }
}

impl<F> Drop for Slot<F> {
    fn drop(&mut self) {
        let mut slots = self.shared.slots.lock().unwrap_or_else(|e| e.into_inner());
        if self.uid == 0 {
            slots.root -= 1;
        } else {
            slots.unprivileged -= 1;
            if let Some(n) = slots.per_uid.get_mut(&self.uid) {
                *n -= 1;
                if *n == 0 {
                    slots.per_uid.remove(&self.uid);
                }
            }
        }
    }
}

/// The last encoded reply to a read request, with the time its computation began. Held
/// weakly: it lives while a client is still being sent it, and its megabytes (a status of
/// thousands of policies) are not kept once nobody is.
type Cached = Mutex<Option<(Instant, Weak<[u8]>)>>;

/// Read replies (list, status, stats) shared by the clients waiting for them. A client is
/// given a reply whose computation began after its request arrived, so it sees nothing older
/// than its own request; a thousand clients asking at once cost a few computations, not a
/// thousand. Root's replies are kept apart from the others', which are also paced.
#[derive(Default)]
struct Replies {
    root: [Cached; 3],
    others: [Cached; 3],
}

/// Bytes per second sent to non-root clients, all together: a status of 4,000 policies (about
/// 1.3 MB) six times a second.
const UNPRIVILEGED_BYTES_PER_SECOND: usize = 8 << 20;

/// A token bucket of bytes, holding at most one second's worth.
struct ByteBudget {
    rate: usize,
    tokens: f64,
    last: Instant,
}

impl ByteBudget {
    fn new(rate: usize) -> Self {
        ByteBudget {
            rate,
            tokens: rate as f64,
            last: Instant::now(),
        }
    }

    /// Waits until `bytes` may be sent, and counts them as sent. A reply larger than the
    /// bucket goes out once the bucket is full, leaving it in debt.
    async fn take(&mut self, bytes: usize) {
        let rate = self.rate as f64;
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(rate);
        self.last = now;
        let want = (bytes as f64).min(rate);
        if self.tokens < want {
            tokio::time::sleep(Duration::from_secs_f64((want - self.tokens) / rate)).await;
            self.tokens = want;
            self.last = Instant::now();
        }
        self.tokens -= bytes as f64;
    }
}

/// A reply this large (a status of a few thousand policies) is followed by a trim of the heap.
const BIG_REPLY: usize = 1 << 20;

/// Non-root readers get at most this many computations of each reply per second between
/// them: a status of thousands of policies takes milliseconds to build.
const UNPRIVILEGED_READ_INTERVAL: Duration = Duration::from_millis(250);

impl<F, Fut> Shared<F>
where
    F: Fn(Request, Option<u32>) -> Fut,
    Fut: Future<Output = Response>,
{
    async fn serve(&self, stream: UnixStream, uid: u32, pid: Option<u32>, _slot: Slot<F>) {
        let (mut read, mut write) = stream.into_split();
        let request = match tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut read)).await {
            Err(_) => Err("timed out waiting for the request".to_string()),
            Ok(result) => result,
        };
        let reply: Arc<[u8]> = match request {
            Err(message) => self.refused(uid, message),
            Ok(request) if request.mutates() && uid != 0 => self.refused(
                uid,
                "permission denied: only root may change policies".to_string(),
            ),
            Ok(request) => {
                let arrived = Instant::now();
                match self.replies.slot(uid, &request) {
                    Some(cache) => self.shared_reply(cache, uid, request, arrived).await,
                    None => {
                        let reply = (self.handle)(request, pid).await;
                        if let Response::Error { message } = &reply {
                            self.log_refused(uid, message);
                        }
                        protocol::encode(&reply).into()
                    }
                }
            }
        };
        let _ = tokio::time::timeout(REPLY_TIMEOUT, async {
            if uid != 0 {
                // Held while waiting: non-root replies go out in turn.
                self.unprivileged_bytes.lock().await.take(reply.len()).await;
            }
            write.write_all(&reply).await?;
            write.shutdown().await
        })
        .await;
        // Closing with unread input would reset the connection before the client reads the
        // reply (an oversized request): discard what is left, within limits.
        let mut rest = (&mut read).take(DRAIN_LIMIT);
        let _ = tokio::time::timeout(
            DRAIN_TIMEOUT,
            tokio::io::copy(&mut rest, &mut tokio::io::sink()),
        )
        .await;
    }

    /// The reply to a read request, computed at most once for all who wait for it.
    async fn shared_reply(
        &self,
        cache: &Cached,
        uid: u32,
        request: Request,
        arrived: Instant,
    ) -> Arc<[u8]> {
        // Held while computing: those who arrive meanwhile wait, then take the next result.
        let mut cached = cache.lock().await;
        if let Some((began, reply)) = cached.as_ref() {
            if *began >= arrived {
                if let Some(reply) = reply.upgrade() {
                    return reply;
                }
            }
            if uid != 0 {
                // Those arriving during the pause share what follows it.
                tokio::time::sleep_until((*began + UNPRIVILEGED_READ_INTERVAL).into()).await;
            }
        }
        let began = Instant::now();
        // Shared replies (list, status, stats) do not depend on who asked.
        let reply: Arc<[u8]> = protocol::encode(&(self.handle)(request, None).await).into();
        if reply.len() > BIG_REPLY {
            // Building it left as many small allocations freed, scattered over the heap.
            crate::host::sys::release_free_memory();
        }
        *cached = Some((began, Arc::downgrade(&reply)));
        reply
    }

    fn refused(&self, uid: u32, message: String) -> Arc<[u8]> {
        self.log_refused(uid, &message);
        protocol::encode(&Response::error(message)).into()
    }

    fn log_refused(&self, uid: u32, message: &str) {
        let allowed = self
            .refused_log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .allow();
        if let Some(held) = allowed {
            // The message may quote the request: escaped, it cannot forge a log line.
            warn!(
                uid,
                "request refused: {}{}",
                escape(message),
                held_note(held)
            );
        }
    }
}

impl Replies {
    fn slot(&self, uid: u32, request: &Request) -> Option<&Cached> {
        let kinds = if uid == 0 { &self.root } else { &self.others };
        match request {
            Request::List => Some(&kinds[0]),
            Request::Status => Some(&kinds[1]),
            Request::Stats => Some(&kinds[2]),
            Request::Set { .. }
            | Request::Exec { .. }
            | Request::Unset { .. }
            | Request::Reload => None,
        }
    }
}

/// Reads one line (or everything up to EOF), refusing more than MAX_REQUEST_BYTES.
async fn read_request(read: &mut OwnedReadHalf) -> Result<Request, String> {
    let mut reader = BufReader::new(read.take(MAX_REQUEST_BYTES as u64 + 1));
    let mut line = Vec::new();
    reader
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| format!("cannot read the request: {e}"))?;
    if line.len() > MAX_REQUEST_BYTES {
        return Err(format!(
            "request too large (limit {MAX_REQUEST_BYTES} bytes)"
        ));
    }
    protocol::decode_request(&line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    type Unused = fn(Request, Option<u32>) -> std::future::Ready<Response>;

    fn shared(limits: Limits) -> Arc<Shared<Unused>> {
        Arc::new(Shared {
            handle: (|_, _| std::future::ready(Response::error("unused"))) as Unused,
            slots: StdMutex::new(Slots::default()),
            limits,
            replies: Replies::default(),
            refused_log: StdMutex::new(LogLimiter::new(LOG_PERIOD, LOG_BURST)),
            unprivileged_bytes: Mutex::new(ByteBudget::new(UNPRIVILEGED_BYTES_PER_SECOND)),
        })
    }

    #[test]
    fn slots_are_counted_per_uid_and_root_keeps_its_own() {
        let s = shared(Limits {
            per_uid: 2,
            unprivileged: 3,
            root: 1,
        });
        let a1 = Slot::take(&s, 1000).unwrap();
        let _a2 = Slot::take(&s, 1000).unwrap();
        assert!(Slot::take(&s, 1000)
            .unwrap_err()
            .contains("uid 1000 (limit 2)"));
        let _b1 = Slot::take(&s, 1001).unwrap();
        assert!(Slot::take(&s, 1002).unwrap_err().contains("non-root users"));
        let root = Slot::take(&s, 0).unwrap();
        assert!(Slot::take(&s, 0).unwrap_err().contains("root (limit 1)"));
        drop(a1);
        let _a3 = Slot::take(&s, 1000).unwrap();
        drop(root);
        let _root = Slot::take(&s, 0).unwrap();
    }

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
            let listener = bind(&path).unwrap();
            tokio::spawn(serve(listener, LIMITS, move |_, _| {
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
