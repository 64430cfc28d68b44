//! Pods' annotations as policies: the events that change them, and pods.json.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use tracing::{error, info, warn};

use super::state::State;
use crate::{
    containers::pods::PodEvent,
    daemon::store::{StoreError, StoredPolicy},
    host::cgroup,
};

/// `--pod-events PATH`: one JSON [`PodEvent`] per line. A FIFO is opened for reading and
/// writing, so that writers may come and go; a bad line is logged and skipped.
pub(super) async fn read_pod_events(path: PathBuf, events: tokio::sync::mpsc::Sender<PodEvent>) {
    use tokio::io::AsyncBufReadExt as _;
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
    let mut lines = tokio::io::BufReader::new(reader).lines();
    loop {
        match lines.next_line().await {
            Ok(Some(line)) if line.trim().is_empty() => {}
            Ok(Some(line)) => match serde_json::from_str::<PodEvent>(&line) {
                Ok(event) => {
                    if events.send(event).await.is_err() {
                        return;
                    }
                }
                Err(e) => warn!("pod events {}: bad line: {e}", path.display()),
            },
            Ok(None) => return,
            Err(e) => {
                error!("pod events {}: {e}", path.display());
                return;
            }
        }
    }
}

impl State {
    /// One event from the pod watcher: the pods' policies are worked out again and the
    /// paths whose policy changed are brought in line.
    pub(super) fn on_pod_event(&mut self, event: PodEvent) {
        if let PodEvent::Connection { ok, message } = &event {
            if let Some(status) = &mut self.pods_status {
                // Once per change: the watcher retries with backoff, and says so each time.
                if !ok && (status.connected || status.error != *message) {
                    warn!(
                        "pod watcher: {}; the pod policies in force stay, retrying",
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
                    Err(e) => invalid.push(format!("{}: {e}", w.pod)),
                },
                Err(e) => invalid.push(format!("{}: {e}", w.pod)),
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
