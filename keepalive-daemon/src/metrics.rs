//! Prometheus metrics: the text exposition format, served over plain HTTP at `/metrics`.
use std::{fmt::Write as _, future::Future, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tracing::warn;

use crate::protocol::StatsEntry;

/// A request head larger than this is refused.
const MAX_HEAD: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(5);

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
pub async fn serve<F, Fut>(listener: TcpListener, body: F)
where
    F: Fn() -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = String> + Send,
{
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let body = body.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, body).await {
                        warn!("metrics request failed: {e}");
                    }
                });
            }
            Err(e) => warn!("metrics accept failed: {e}"),
        }
    }
}

async fn answer<F, Fut>(mut stream: TcpStream, body: F) -> std::io::Result<()>
where
    F: Fn() -> Fut,
    Fut: Future<Output = String>,
{
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(head)) => head,
        _ => return respond(&mut stream, "400 Bad Request", "bad request\n").await,
    };
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => respond(&mut stream, "200 OK", &body().await).await,
        ("GET", _) => respond(&mut stream, "404 Not Found", "not found: try /metrics\n").await,
        _ => respond(&mut stream, "405 Method Not Allowed", "only GET\n").await,
    }
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

async fn respond(stream: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

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
