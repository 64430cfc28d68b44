//! Pods' annotations as policies: the events that change them, and pods.json.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    time::Duration,
};

use tracing::{error, info, warn};

use super::state::State;
use crate::{
    containers::pods::PodEvent,
    daemon::store::{StoreError, StoredPolicy},
    host::cgroup,
    host::logging::{self, LogLimiter},
};

/// The longest event line read; a longer one is refused (a real event is a few hundred bytes).
const MAX_LINE: u64 = 64 * 1024;

/// `--pod-events PATH`: one JSON [`PodEvent`] per line. A FIFO is opened for reading and
/// writing, so that writers may come and go. A bad line (not UTF-8, not JSON, too long) is
/// refused, logged (rate-limited, escaped) and shown in `kad status`; the lines after it are
/// read as usual.
pub(super) async fn read_pod_events(path: PathBuf, events: tokio::sync::mpsc::Sender<PodEvent>) {
    let is_fifo = std::fs::metadata(&path)
        .map(|m| std::os::unix::fs::FileTypeExt::is_fifo(&m.file_type()))
        .unwrap_or(false);
    let reader: Box<dyn tokio::io::AsyncRead + Unpin + Send> = if is_fifo {
        match tokio::net::unix::pipe::OpenOptions::new()
            .read_write(true)
            .open_receiver(&path)
        {
            Ok(pipe) => Box::new(pipe),
            Err(e) => {
                error!("cannot open the pod events {}: {e}", path.display());
                return;
            }
        }
    } else {
        match tokio::fs::File::open(&path).await {
            Ok(file) => Box::new(file),
            Err(e) => {
                error!("cannot open the pod events {}: {e}", path.display());
                return;
            }
        }
    };
    let _ = events
        .send(PodEvent::Connection {
            ok: true,
            message: None,
        })
        .await;
    let ended = read_lines(&path, reader, &events).await;
    // A stream that ends (or fails) is a watcher that is gone: `kad status` says so.
    let _ = events
        .send(PodEvent::Connection {
            ok: false,
            message: Some(ended),
        })
        .await;
}

/// Reads events until the stream ends; returns why it ended.
async fn read_lines(
    path: &std::path::Path,
    reader: impl tokio::io::AsyncRead + Unpin,
    events: &tokio::sync::mpsc::Sender<PodEvent>,
) -> String {
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _};
    let mut reader = tokio::io::BufReader::new(reader);
    let mut refused_log = LogLimiter::new(Duration::from_secs(10), 5);
    let mut line = Vec::new();
    let mut number = 0u64;
    loop {
        line.clear();
        let read = (&mut reader)
            .take(MAX_LINE + 1)
            .read_until(b'\n', &mut line)
            .await;
        match read {
            Ok(0) => {
                return format!(
                    "the pod events {} ended: nothing more is read until the daemon restarts",
                    path.display()
                )
            }
            Ok(_) => {}
            Err(e) => return format!("cannot read the pod events {}: {e}", path.display()),
        }
        number += 1;
        let problem = if line.len() as u64 > MAX_LINE {
            // Skip the rest of the line, without keeping it.
            let mut rest = Vec::new();
            while !line.ends_with(b"\n") && !rest.ends_with(b"\n") {
                rest.clear();
                match (&mut reader)
                    .take(MAX_LINE)
                    .read_until(b'\n', &mut rest)
                    .await
                {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            Some(format!("longer than {MAX_LINE} bytes"))
        } else {
            match std::str::from_utf8(&line) {
                Err(e) => Some(format!("not UTF-8 ({e})")),
                Ok(text) if text.trim().is_empty() => continue,
                Ok(text) => match serde_json::from_str::<PodEvent>(text) {
                    Ok(event) => {
                        if events.send(event).await.is_err() {
                            return "the daemon stops".into();
                        }
                        None
                    }
                    Err(e) => Some(e.to_string()),
                },
            }
        };
        if let Some(problem) = problem {
            let message = format!("line {number} refused: {problem}: {}", shown_line(&line));
            if let Some(held) = refused_log.allow() {
                warn!(
                    "pod events {}: {message}{}",
                    path.display(),
                    logging::held_note(held)
                );
            }
            if events.send(PodEvent::Refused { message }).await.is_err() {
                return "the daemon stops".into();
            }
        }
    }
}

/// A refused line as it may be shown: its first bytes, control characters escaped and bytes
/// that are not UTF-8 as `\xNN`.
fn shown_line(line: &[u8]) -> String {
    const SHOWN: usize = 120;
    let body = line.strip_suffix(b"\n").unwrap_or(line);
    let mut out = String::new();
    for chunk in body[..body.len().min(SHOWN)].utf8_chunks() {
        out.push_str(&logging::escape(chunk.valid()));
        for byte in chunk.invalid() {
            out.push_str(&format!("\\x{byte:02x}"));
        }
    }
    if body.len() > SHOWN {
        out.push_str("...");
    }
    out
}

impl State {
    /// One event from the pod watcher: the pods' policies are worked out again and the
    /// paths whose policy changed are brought in line.
    pub(super) fn on_pod_event(&mut self, event: PodEvent) {
        if let PodEvent::Connection { ok, message } = &event {
            if let Some(status) = &mut self.pods_status {
                // Once per change: the watcher retries with backoff, and says so each time.
                if !ok && (status.connected || status.error != *message) {
                    // The Kubernetes watcher tries again; a stream of events that ended does not.
                    let retrying = if status.source.starts_with("kubernetes") {
                        ", retrying"
                    } else {
                        ""
                    };
                    warn!(
                        "pod watcher: {}; the pod policies in force stay{retrying}",
                        message.as_deref().unwrap_or("disconnected")
                    );
                } else if *ok && !status.connected {
                    info!("pod watcher: connected");
                }
                status.connected = *ok;
                status.error = if *ok { None } else { message.clone() };
            }
            return;
        }
        if let PodEvent::Refused { message } = event {
            if let Some(status) = &mut self.pods_status {
                status.refused = Some(message);
            }
            return;
        }
        if !self.pod_table.apply(event) {
            return;
        }
        let mut wanted = BTreeMap::new();
        let mut invalid = Vec::new();
        for (relative, w) in self.pod_table.wanted(&self.config.kubelet) {
            match w.policy {
                Ok(policy) => match cgroup::policy_path(&self.root, &relative) {
                    Ok(path) => {
                        wanted.insert(path, (policy, w.pod));
                    }
                    Err(e) => invalid.push(format!("{}: {e}", logging::escape(&w.pod))),
                },
                Err(e) => invalid.push(format!("{}: {e}", logging::escape(&w.pod))),
            }
        }
        if let Some(status) = &mut self.pods_status {
            for line in invalid.iter().filter(|l| !status.invalid.contains(l)) {
                warn!("pod without a policy: {line}");
            }
            status.pods = self.pod_table.pods();
            status.invalid = invalid;
        }
        if wanted == self.from_pods {
            return;
        }
        let changed: BTreeSet<PathBuf> = wanted
            .iter()
            .filter(|(path, w)| self.from_pods.get(*path) != Some(*w))
            .map(|(path, _)| path.clone())
            .chain(
                self.from_pods
                    .keys()
                    .filter(|path| !wanted.contains_key(*path))
                    .cloned(),
            )
            .collect();
        self.from_pods = wanted;
        for path in &changed {
            match self.from_pods.get(path) {
                Some((policy, pod)) => {
                    info!(cgroup = ?path.display().to_string(), pod = %pod, %policy, "pod policy")
                }
                None => info!(cgroup = ?path.display().to_string(), "pod policy removed"),
            }
            if let Err(e) = self.sync_path(path) {
                error!(cgroup = ?path.display().to_string(), "{e}");
            }
        }
        let wanted: Vec<PathBuf> = self.effective().into_keys().collect();
        self.reconciler.drop_stale_ids(&wanted);
        if let Err(e) = self.save_pods() {
            error!("cannot save the pod policies: {e}");
        }
    }

    pub(super) fn save_pods(&self) -> Result<(), StoreError> {
        self.ensure_state_dir();
        let entries: Vec<StoredPolicy> = self
            .from_pods
            .iter()
            .map(|(path, (policy, pod))| StoredPolicy {
                pod: Some(pod.clone()),
                ..StoredPolicy::new(path.display().to_string(), policy, None)
            })
            .collect();
        self.pods_store.save(&entries)
    }
}
