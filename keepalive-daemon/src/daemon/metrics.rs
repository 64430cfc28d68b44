//! Prometheus metrics: the text exposition format, served over plain HTTP at `/metrics`.
use std::{
    collections::VecDeque,
    fmt::Write as _,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{oneshot, Semaphore},
};
use tracing::warn;

use crate::{
    api::protocol::StatsEntry,
    host::logging::{held_note, LogLimiter},
};

/// A request head larger than this is refused.
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

/// Renders the counters, with the policy cgroup as a label.
pub fn render(stats: &[StatsEntry], policies: usize, attachments: usize) -> String {
    let mut out = String::new();
    let mut family =
        |name: &str, help: &str, kind: &str, rows: &mut dyn Iterator<Item = (String, u64)>| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, value) in rows {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
    let label = |cgroup: &str, extra: &str| format!("{{cgroup=\"{}\"{extra}}}", escape(cgroup));
    family(
        "kad_connections_configured_total",
        "TCP connections that kad gave keepalive, by policy cgroup and side.",
        "counter",
        &mut stats.iter().flat_map(|s| {
            [
                (label(&s.cgroup, ",side=\"connect\""), s.connect),
                (label(&s.cgroup, ",side=\"accept\""), s.accept),
            ]
        }),
    );
    family(
        "kad_setsockopt_failures_total",
        "bpf_setsockopt calls the kernel refused, by policy cgroup.",
        "counter",
        &mut stats
            .iter()
            .map(|s| (label(&s.cgroup, ""), s.setsockopt_failures)),
    );
    family(
        "kad_keepalive_kills_total",
        "Connections closed because keepalive found the peer dead, by policy cgroup.",
        "counter",
        &mut stats
            .iter()
            .map(|s| (label(&s.cgroup, ""), s.keepalive_kills)),
    );
    family(
        "kad_existing_connections_updated_total",
        "Connections that existed before a policy and were given it, by policy cgroup.",
        "counter",
        &mut stats.iter().map(|s| (label(&s.cgroup, ""), s.refreshed)),
    );
    family(
        "kad_overridden_total",
        "Connections whose program set its own keepalive options after kad (rewritten under --enforce), by policy cgroup.",
        "counter",
        &mut stats.iter().map(|s| (label(&s.cgroup, ""), s.overridden)),
    );
    family(
        "kad_policies",
        "Policies in the table (set with kad set or from the config file).",
        "gauge",
        &mut std::iter::once((String::new(), policies as u64)),
    );
    family(
        "kad_attachments",
        "Anchor cgroups with kad's programs attached.",
        "gauge",
        &mut std::iter::once((String::new(), attachments as u64)),
    );
    out
}

/// Label values escape backslash, double quote and newline.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Answers `GET /metrics` with `body()`; anything else gets 404 or 400.
pub async fn serve<F, Fut>(listener: TcpListener, limits: Limits, body: F)
where
    F: Fn() -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = String> + Send,
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

/// Reads the request head (unless `evicted` fires first: the connection is closed to make
/// room), calls `head_read`, then answers.
async fn answer<F, Fut>(
    mut stream: TcpStream,
    limits: Limits,
    body: F,
    evicted: oneshot::Receiver<()>,
    head_read: impl FnOnce(),
) -> std::io::Result<()>
where
    F: Fn() -> Fut,
    Fut: Future<Output = String>,
{
    let head = tokio::select! {
        head = tokio::time::timeout(limits.read_timeout, read_head(&mut stream)) => head,
        _ = evicted => return Ok(()),
    };
    head_read();
    let head = match head {
        Ok(Ok(head)) => head,
        _ => return respond(&mut stream, limits, "400 Bad Request", "bad request\n").await,
    };
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, text) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => ("200 OK", body().await),
        ("GET", _) => ("404 Not Found", "not found: try /metrics\n".to_string()),
        _ => ("405 Method Not Allowed", "only GET\n".to_string()),
    };
    respond(&mut stream, limits, status, &text).await
}

async fn read_head(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_HEAD {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

async fn respond(
    stream: &mut TcpStream,
    limits: Limits,
    status: &str,
    body: &str,
) -> std::io::Result<()> {
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tokio::time::timeout(limits.write_timeout, async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    })
    .await
    .map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the client did not take the response in time",
        )
    })?
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
                serve(listener, limits, move || async move { body.to_string() }).await
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

    #[test]
    fn renders_counters_with_cgroup_labels() {
        let stats = [StatsEntry {
            cgroup: "/sys/fs/cgroup/a \"b\"".into(),
            connect: 3,
            accept: 2,
            setsockopt_failures: 0,
            keepalive_kills: 1,
            refreshed: 4,
            overridden: 5,
        }];
        let text = render(&stats, 1, 1);
        assert!(text.contains("kad_overridden_total{cgroup=\"/sys/fs/cgroup/a \\\"b\\\"\"} 5\n"));
        assert!(text.contains("# TYPE kad_connections_configured_total counter\n"));
        assert!(text.contains(
            "kad_connections_configured_total{cgroup=\"/sys/fs/cgroup/a \\\"b\\\"\",side=\"connect\"} 3\n"
        ));
        assert!(
            text.contains("kad_keepalive_kills_total{cgroup=\"/sys/fs/cgroup/a \\\"b\\\"\"} 1\n")
        );
        assert!(text.contains("kad_policies 1\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.split(' ').count() >= 2, "{line}");
        }
    }
}
