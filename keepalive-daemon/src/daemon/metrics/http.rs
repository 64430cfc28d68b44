//! The `/metrics` endpoint: hyper's HTTP/1 server (the hyper kube already brings), one request
//! per connection, behind our own accept loop, which bounds the connections served at once,
//! closes the idle ones to make room, and bounds how long a request may take to arrive and its
//! response to be taken.
use std::{
    collections::VecDeque,
    convert::Infallible,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    body::Incoming,
    header::{self, HeaderValue},
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{oneshot, Semaphore},
};
use tracing::warn;

use crate::host::logging::{held_note, LogLimiter};

/// A request head larger than this is refused (431); hyper's smallest read buffer.
const MAX_HEAD: usize = 8 * 1024;

/// How the endpoint holds up against clients that connect and never read or write.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; a new one past that closes the one that has waited
    /// longest for its request head.
    pub connections: usize,
    /// For the request head to arrive.
    pub read_timeout: Duration,
    /// For the response to be taken.
    pub write_timeout: Duration,
    /// After a failed accept (EMFILE, ENFILE...): the connection stays queued, so retrying at
    /// once would spin.
    pub accept_backoff: Duration,
}

/// A scraper is one client; a few more leave room for a person with curl.
pub const LIMITS: Limits = Limits {
    connections: 16,
    read_timeout: Duration::from_secs(5),
    write_timeout: Duration::from_secs(10),
    accept_backoff: Duration::from_millis(100),
};

/// Log lines a misbehaving client may cause: this many per period, then a count.
const LOG_PERIOD: Duration = Duration::from_secs(10);
const LOG_BURST: u32 = 5;

/// Answers `GET /metrics` with `body()`; anything else gets 404 or 400.
pub async fn serve<F, Fut>(listener: TcpListener, limits: Limits, body: F)
where
    F: Fn() -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = Result<String, String>> + Send,
{
    let permits = Arc::new(Semaphore::new(limits.connections));
    // Connections still waiting for their request head, oldest first, each with the means to
    // close it: when all slots are taken, the oldest makes room, so idle connections cannot
    // keep a scraper out (a scraper sends its head at once).
    let waiting: Arc<Mutex<Waiting>> = Arc::default();
    let mut next_id = 0u64;
    let mut accept_log = LogLimiter::new(LOG_PERIOD, LOG_BURST);
    let failed_log = Arc::new(Mutex::new(LogLimiter::new(LOG_PERIOD, LOG_BURST)));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                if let Some(held) = accept_log.allow() {
                    warn!(
                        "metrics accept failed: {e}; retrying in {} ms{}",
                        limits.accept_backoff.as_millis(),
                        held_note(held)
                    );
                }
                tokio::time::sleep(limits.accept_backoff).await;
                continue;
            }
        };
        let permit = match Arc::clone(&permits).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let oldest = lock(&waiting).pop_front();
                if let Some((_, evict)) = oldest {
                    let _ = evict.send(());
                }
                // Else every slot is writing a response, which its write timeout bounds.
                match Arc::clone(&permits).acquire_owned().await {
                    Ok(permit) => permit,
                    // Never closed; were it, there would be nothing left to serve.
                    Err(_) => return,
                }
            }
        };
        let (evict, evicted) = oneshot::channel();
        let id = next_id;
        next_id += 1;
        lock(&waiting).push_back((id, evict));
        let (body, waiting, failed_log) =
            (body.clone(), Arc::clone(&waiting), Arc::clone(&failed_log));
        tokio::spawn(async move {
            let result = answer(stream, limits, body, evicted, || {
                lock(&waiting).retain(|(other, _)| *other != id)
            })
            .await;
            if let Err(e) = result {
                if let Some(held) = lock(&failed_log).allow() {
                    warn!("metrics request failed: {e}{}", held_note(held));
                }
            }
            drop(permit);
        });
    }
}

/// Connections waiting for their request head: an id and what closes the connection.
type Waiting = VecDeque<(u64, oneshot::Sender<()>)>;

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Serves one request on `stream`: closed unannounced if `evicted` fires (to make room) or no
/// request head comes within the read timeout, cut off if the response is not taken within the
/// write timeout. `head_read` is called once the head is in (or the connection is over).
async fn answer<F, Fut>(
    stream: TcpStream,
    limits: Limits,
    body: F,
    evicted: oneshot::Receiver<()>,
    head_read: impl FnOnce(),
) -> Result<(), String>
where
    F: Fn() -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = Result<String, String>> + Send,
{
    let (read_tx, read_rx) = oneshot::channel::<()>();
    let read_tx = Mutex::new(Some(read_tx));
    let service = service_fn(move |request: Request<Incoming>| {
        if let Some(tx) = lock(&read_tx).take() {
            let _ = tx.send(());
        }
        let body = body.clone();
        async move { Ok::<_, Infallible>(respond(&request, body).await) }
    });
    let connection = http1::Builder::new()
        .keep_alive(false)
        // The timeouts are ours, below: one place, one clock.
        .header_read_timeout(None)
        .max_buf_size(MAX_HEAD)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    // A dropped sender (the connection left the waiting list) is no eviction.
    let evicted = async {
        if evicted.await.is_err() {
            std::future::pending::<()>().await
        }
    };
    tokio::select! {
        done = &mut connection => {
            head_read();
            return done.or_else(quiet);
        }
        _ = read_rx => head_read(),
        _ = evicted => return Ok(()),
        _ = tokio::time::sleep(limits.read_timeout) => {
            head_read();
            return Ok(());
        }
    }
    match tokio::time::timeout(limits.write_timeout, connection).await {
        Ok(done) => done.or_else(quiet),
        Err(_) => Err("the client did not take the response in time".to_string()),
    }
}

/// What a client did wrong is answered (hyper sends 400 or 431 for a bad or large head) or
/// its own doing (it went away), not logged; the rest is.
fn quiet(e: hyper::Error) -> Result<(), String> {
    if e.is_parse() || e.is_parse_too_large() || e.is_incomplete_message() || e.is_canceled() {
        Ok(())
    } else {
        Err(e.to_string())
    }
}

/// `GET /metrics` gets `body()` (500 with its error if it fails); any other path 404, any
/// other method 405.
async fn respond<F, Fut>(request: &Request<Incoming>, body: F) -> Response<Full<Bytes>>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<String, String>>,
{
    let (status, text) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => match body().await {
            Ok(text) => (StatusCode::OK, text),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        },
        (&Method::GET, _) => (StatusCode::NOT_FOUND, "not found: try /metrics\n".into()),
        _ => (StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into()),
    };
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(super::exposition::CONTENT_TYPE),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        io::{Read, Write},
        net::{SocketAddr, TcpStream as StdStream},
        time::Instant,
    };

    /// Serves `body` with `limits` on a loopback port, on a runtime of its own.
    fn server(limits: Limits, body: &'static str) -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = TcpListener::from_std(listener).unwrap();
                serve(
                    listener,
                    limits,
                    move || async move { Ok(body.to_string()) },
                )
                .await
            });
        });
        addr
    }

    fn get(addr: SocketAddr) -> StdStream {
        let mut s = StdStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
        s
    }

    /// Reads to EOF (the server closed) and returns what came.
    fn read_all(s: &mut StdStream) -> Vec<u8> {
        let mut out = Vec::new();
        s.read_to_end(&mut out).expect("the server closes in time");
        out
    }

    /// Sends `request` as is and returns the whole response.
    fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = StdStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(request).unwrap();
        String::from_utf8_lossy(&read_all(&mut s)).into_owned()
    }

    #[test]
    fn only_get_metrics_is_served_and_a_large_head_is_refused() {
        let addr = server(LIMITS, "kad_policies 1\n");
        let ok = exchange(addr, b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains("content-type: text/plain; version=0.0.4; charset=utf-8\r\n")
                && ok.contains("content-length: 15\r\n")
                && ok.ends_with("\r\n\r\nkad_policies 1\n"),
            "{ok}"
        );
        // One request per connection: the server closed after it (read_all returned).
        let other = exchange(addr, b"GET / HTTP/1.1\r\n\r\n");
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
        let post = exchange(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        let garbage = exchange(addr, b"\x01\x02 not http\r\n\r\n");
        assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
        let mut large = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        large.extend(std::iter::repeat_n(b'a', 2 * MAX_HEAD));
        large.extend(b"\r\n\r\n");
        let mut s = StdStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        // The server may stop reading (and close) before all of it is sent.
        let _ = s.write_all(&large);
        let mut head = [0u8; 12];
        s.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 431");
    }

    #[test]
    fn a_head_that_does_not_come_in_time_closes_the_connection() {
        let limits = Limits {
            read_timeout: Duration::from_millis(300),
            ..LIMITS
        };
        let addr = server(limits, "kad_policies 1\n");
        let mut silent = StdStream::connect(addr).unwrap();
        // A head sent a byte at a time: the timeout is for all of it, not for each read.
        let mut slow = StdStream::connect(addr).unwrap();
        let start = Instant::now();
        for b in b"GET /metrics HTTP/1.1\r\n".iter().take(8) {
            if slow.write_all(&[*b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for s in [&mut silent, &mut slow] {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            assert!(matches!(s.read(&mut [0u8; 1]), Ok(0)), "closed, unanswered");
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn idle_connections_make_room_for_a_scraper() {
        let limits = Limits {
            connections: 2,
            read_timeout: Duration::from_secs(60),
            ..LIMITS
        };
        let addr = server(limits, "kad_policies 1\n");
        let mut idle: Vec<StdStream> = (0..10).map(|_| StdStream::connect(addr).unwrap()).collect();
        let start = Instant::now();
        let response = String::from_utf8(read_all(&mut get(addr))).unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        assert!(response.ends_with("kad_policies 1\n"));
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
        // The server holds at most `connections` of them; it closed the others.
        let closed = idle
            .iter_mut()
            .map(|s| {
                s.set_read_timeout(Some(Duration::from_millis(200)))
                    .unwrap();
                matches!(s.read(&mut [0u8; 1]), Ok(0))
            })
            .filter(|&closed| closed)
            .count();
        assert!(closed >= 10 - limits.connections, "{closed} of 10 closed");
    }

    #[test]
    fn a_client_that_does_not_read_is_cut_off_and_frees_its_slot() {
        static BIG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let body: &'static str = BIG.get_or_init(|| "x".repeat(64 << 20));
        let limits = Limits {
            connections: 1,
            write_timeout: Duration::from_millis(300),
            ..LIMITS
        };
        let addr = server(limits, body);
        let mut stuck = get(addr);
        // Long past the write timeout, with the socket buffers full.
        std::thread::sleep(Duration::from_millis(1500));
        let got = read_all(&mut stuck);
        assert!(
            got.len() < body.len(),
            "cut off: {} of {} bytes",
            got.len(),
            body.len()
        );
        // The one slot is free again: the next client is answered.
        let mut next = get(addr);
        let mut head = [0u8; 15];
        next.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 200 OK");
    }
}
