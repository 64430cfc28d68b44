//! Serving one connection of the control socket: its request read within a size and a time
//! limit, non-root clients kept to reading and paced, read replies computed once for all the
//! clients waiting for them.
use std::{
    future::Future,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex as StdMutex, Weak,
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{unix::OwnedReadHalf, UnixStream},
    sync::Mutex,
};
use tracing::{debug, warn};

use super::{slots::Slot, LOG_BURST, LOG_PERIOD};
use crate::{
    api::protocol::{self, Peer, Request, Response, MAX_REQUEST_BYTES},
    host::logging::{escape, held_note, LogLimiter},
};

/// The reply to a connection closed without a request.
const EMPTY: &str = "malformed request: the connection was closed without a request";

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to read its reply (a status of thousands of policies is MBs).
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// What is read and thrown away, without waiting, after replying to a request that was not
/// read whole: what a unix socket's buffer holds (212,992 bytes by default). Reading on would
/// let one client cost the daemon a copy of everything it cares to send.
const DRAIN_LIMIT: usize = 256 << 10;

/// Bytes per second sent to non-root clients, all together: a status of 4,000 policies (about
/// 1.3 MB) six times a second.
const UNPRIVILEGED_BYTES_PER_SECOND: usize = 8 << 20;

/// A reply this large (a status of a few thousand policies) is followed by a trim of the heap.
const BIG_REPLY: usize = 1 << 20;

/// Non-root readers get at most this many computations of each reply per second between
/// them: a status of thousands of policies takes milliseconds to build.
const UNPRIVILEGED_READ_INTERVAL: Duration = Duration::from_millis(250);

/// What every connection shares: the request handler and the limits on what it costs.
pub(super) struct Shared<F> {
    handle: F,
    replies: Replies,
    refused_log: StdMutex<LogLimiter>,
    /// What non-root clients may be sent, together: copying megabytes of status to each of
    /// them is what a flood of readers would cost.
    unprivileged_bytes: Mutex<ByteBudget>,
}

/// Non-root clients are sent at most this many different computations of each read reply at
/// a time: slow readers each holding a newer one would otherwise keep megabytes apiece (a
/// status of 10,000 policies is 3 MB).
const UNPRIVILEGED_LIVE_REPLIES: usize = 2;
/// How often a reader waiting for one of those to be sent looks again.
const LIVE_REPLY_POLL: Duration = Duration::from_millis(20);

/// The replies to one kind of read request, and how many clients wait for the lock on them.
#[derive(Default)]
struct Cached {
    waiting: AtomicUsize,
    generations: Mutex<Generations>,
}

/// The last encoded reply, with the time its computation began, and those still being sent.
/// Held weakly: a reply lives while a client is still being sent it, and its megabytes are not
/// kept once nobody is; the last one also while clients wait that may share it.
#[derive(Default)]
struct Generations {
    latest: Option<(Instant, Weak<[u8]>)>,
    held: Option<Arc<[u8]>>,
    /// Non-root's replies that may still be being sent.
    alive: Vec<Weak<[u8]>>,
}

/// Read replies (list, status, stats) shared by the clients waiting for them. A client is
/// given a reply whose computation began after its request arrived, so it sees nothing older
/// than its own request; a thousand clients asking at once cost a few computations, not a
/// thousand. Root's replies are kept apart from the others', which are also paced.
#[derive(Default)]
struct Replies {
    root: [Cached; 3],
    others: [Cached; 3],
}

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

impl<F> Shared<F> {
    pub(super) fn new(handle: F) -> Self {
        Shared {
            handle,
            replies: Replies::default(),
            refused_log: StdMutex::new(LogLimiter::new(LOG_PERIOD, LOG_BURST)),
            unprivileged_bytes: Mutex::new(ByteBudget::new(UNPRIVILEGED_BYTES_PER_SECOND)),
        }
    }
}

impl<F, Fut> Shared<F>
where
    F: Fn(Request, Peer) -> Fut,
    Fut: Future<Output = Response> + Send + 'static,
{
    /// Reads the request, replies, and closes; `_slot` is held until then.
    pub(super) async fn serve(&self, stream: UnixStream, uid: u32, pid: Option<u32>, _slot: Slot) {
        let (mut read, mut write) = stream.into_split();
        let request = match tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut read)).await {
            Err(_) => Err("timed out waiting for the request".to_string()),
            Ok(Ok(Some(request))) => Ok(request),
            // A probe (a second daemon checking whether this one is alive): answered, but not
            // worth a warning.
            Ok(Ok(None)) => {
                debug!(uid, "connection closed without a request");
                Err(EMPTY.to_string())
            }
            Ok(Err(message)) => Err(message),
        };
        let reply: Arc<[u8]> = match request {
            Err(message) if message == EMPTY => protocol::encode(&Response::error(message)).into(),
            Err(message) => self.refused(uid, message),
            Ok(request) if request.root_only() && uid != 0 => self.refused(
                uid,
                "permission denied: only root may change the host policy or reload the config file"
                    .to_string(),
            ),
            Ok(request) => {
                let arrived = Instant::now();
                match self.replies.slot(uid, &request) {
                    Some(cache) => self.shared_reply(cache, uid, request, arrived).await,
                    None => {
                        let reply = (self.handle)(request, Peer { uid, pid }).await;
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
        drop(reply);
        discard_queued(&read);
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
        cache.waiting.fetch_add(1, Ordering::SeqCst);
        let mut cached = cache.generations.lock().await;
        cache.waiting.fetch_sub(1, Ordering::SeqCst);
        if let Some((began, reply)) = cached.latest.as_ref() {
            if *began >= arrived {
                if let Some(reply) = reply.upgrade() {
                    if cache.waiting.load(Ordering::SeqCst) == 0 {
                        cached.held = None;
                    }
                    return reply;
                }
            }
            if uid != 0 {
                // Those arriving during the pause share what follows it.
                tokio::time::sleep_until((*began + UNPRIVILEGED_READ_INTERVAL).into()).await;
            }
        }
        if uid != 0 {
            // Bounded memory: a new computation waits until few older ones are still sent.
            loop {
                cached.alive.retain(|reply| reply.strong_count() > 0);
                if cached.alive.len() < UNPRIVILEGED_LIVE_REPLIES {
                    break;
                }
                tokio::time::sleep(LIVE_REPLY_POLL).await;
            }
        }
        let began = Instant::now();
        // Shared replies (list, status, stats) do not depend on who asked. Built on a thread
        // of their own: a status of 10,000 policies takes tens of milliseconds, which would
        // hold up every other connection (root's) on this one.
        let reply = (self.handle)(request, Peer { uid, pid: None });
        let runtime = tokio::runtime::Handle::current();
        let reply: Arc<[u8]> = tokio::task::spawn_blocking(move || {
            let reply: Arc<[u8]> = protocol::encode(&runtime.block_on(reply)).into();
            if reply.len() > BIG_REPLY {
                // Building it left as many small allocations freed, scattered over the heap.
                crate::host::sys::release_free_memory();
            }
            reply
        })
        .await
        .unwrap_or_else(|e| {
            protocol::encode(&Response::error(format!("cannot build the reply: {e}"))).into()
        });
        cached.latest = Some((began, Arc::downgrade(&reply)));
        // Those who arrived meanwhile take it once this client has been sent it.
        cached.held = (cache.waiting.load(Ordering::SeqCst) > 0).then(|| Arc::clone(&reply));
        if uid != 0 {
            cached.alive.push(Arc::downgrade(&reply));
        }
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
            | Request::ContainerStopped { .. }
            | Request::SetHost { .. }
            | Request::UnsetHost
            | Request::Reload => None,
        }
    }
}

/// Reads and throws away what the client already sent beyond its request, up to
/// `DRAIN_LIMIT`, without waiting for more: closing with unread input would make the client's
/// read fail with ECONNRESET after the reply. A client still writing (a request of megabytes)
/// gets EPIPE, and finds the reply queued for it all the same.
fn discard_queued(read: &OwnedReadHalf) {
    let mut buf = [0u8; 16 * 1024];
    let mut left = DRAIN_LIMIT;
    while left > 0 {
        match read.try_read(&mut buf) {
            Ok(n) if n > 0 => left = left.saturating_sub(n),
            _ => break,
        }
    }
}

/// Reads one line (or everything up to EOF), refusing more than MAX_REQUEST_BYTES: what
/// follows is never read (the connection is closed after the reply). `None`: the client sent
/// nothing at all.
async fn read_request(read: &mut OwnedReadHalf) -> Result<Option<Request>, String> {
    let mut reader = BufReader::new(read.take(MAX_REQUEST_BYTES as u64 + 1));
    let mut line = Vec::new();
    reader
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| format!("cannot read the request: {e}"))?;
    if line.is_empty() {
        return Ok(None);
    }
    if line.len() > MAX_REQUEST_BYTES {
        return Err(format!(
            "request too large (limit {MAX_REQUEST_BYTES} bytes)"
        ));
    }
    protocol::decode_request(&line).map(Some)
}
