//! The bollard glue of `kad daemon --docker`: watches Docker's events API for containers
//! created, renamed and destroyed, lists the labelled containers at each (re)connection, and turns what
//! it sees into [`DockerEvent`]s. Everything else (cgroup paths, policies) is in `docker`.
//!
//! Only the unix socket is spoken (no TLS, no OpenSSL). The API version is negotiated: Debian
//! 12's dockerd 20.10 answers at most 1.41, which has all this needs.
use std::{
    collections::HashMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bollard::{
    query_parameters::{EventsOptionsBuilder, ListContainersOptionsBuilder},
    Docker, API_DEFAULT_VERSION,
};
use futures::StreamExt;
use tokio::sync::mpsc;

use crate::containers::{
    annotation,
    docker::{DockerEvent, Driver},
};

/// How long one request (not the events stream) may take.
const REQUEST_TIMEOUT_SECS: u64 = 30;
/// Backoff between attempts while Docker cannot be reached.
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Why a connection ended; said in `kad status` while retrying.
#[derive(Debug, thiserror::Error)]
enum WatchError {
    #[error("{0}")]
    Docker(#[from] bollard::errors::Error),
    #[error("Docker's cgroup driver is {0:?}, not cgroupfs or systemd")]
    Driver(String),
    #[error("the events stream ended")]
    Ended,
    #[error("kad is stopping")]
    Closed,
}

/// Watches until the daemon stops. Failures are reported as `Connection` events and retried
/// with backoff (up to 10 s apart); what was applied stays meanwhile.
pub async fn run(socket: String, events: mpsc::Sender<DockerEvent>) {
    let mut backoff = BACKOFF_FIRST;
    let mut last_error: Option<String> = None;
    loop {
        let mut connected = false;
        let error = watch(&socket, &events, &mut connected).await;
        if matches!(error, WatchError::Closed) {
            return;
        }
        if connected {
            backoff = BACKOFF_FIRST;
        }
        let message = format!("{}: {error}", socket);
        // Once per change of error: the retries say nothing new.
        if connected || last_error.as_deref() != Some(&message) {
            let event = DockerEvent::Connection {
                ok: false,
                message: Some(message.clone()),
                api: None,
                driver: None,
            };
            if events.send(event).await.is_err() {
                return;
            }
        }
        last_error = Some(message);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One connection: version, driver, the list, then the events until something fails.
async fn watch(
    socket: &str,
    events: &mpsc::Sender<DockerEvent>,
    connected: &mut bool,
) -> WatchError {
    let send = |event| async move { events.send(event).await.map_err(|_| WatchError::Closed) };
    let result: Result<(), WatchError> = async {
        let docker = Docker::connect_with_unix(socket, REQUEST_TIMEOUT_SECS, API_DEFAULT_VERSION)?
            .negotiate_version()
            .await?;
        let info = docker.info().await?;
        let driver_name = info
            .cgroup_driver
            .map(|d| d.to_string())
            .unwrap_or_default();
        let driver = Driver::from_info(&driver_name).ok_or(WatchError::Driver(driver_name))?;
        let version = docker.client_version();
        send(DockerEvent::Connection {
            ok: true,
            message: None,
            api: Some(format!(
                "{}.{}",
                version.major_version, version.minor_version
            )),
            driver: Some(driver),
        })
        .await?;
        *connected = true;
        // Events from a moment before the list are replayed: a container created or removed
        // while the list is made is seen either way (each event is idempotent).
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_sub(Duration::from_secs(1));
        let since = format!("{}.{:09}", since.as_secs(), since.subsec_nanos());
        send(DockerEvent::ListStart).await?;
        let filters = HashMap::from([("label", vec![annotation::KEY])]);
        let listed = docker
            .list_containers(Some(
                ListContainersOptionsBuilder::new()
                    .all(true)
                    .filters(&filters)
                    .build(),
            ))
            .await?;
        for summary in listed {
            let Some(id) = summary.id else { continue };
            if let Some(event) = container_event(&docker, &id, driver).await? {
                send(event).await?;
            }
        }
        send(DockerEvent::ListDone).await?;
        let filters = HashMap::from([
            ("type", vec!["container"]),
            ("event", vec!["create", "rename", "destroy"]),
        ]);
        let mut stream = docker.events(Some(
            EventsOptionsBuilder::new()
                .since(&since)
                .filters(&filters)
                .build(),
        ));
        while let Some(message) = stream.next().await {
            let message = message?;
            let Some(actor) = message.actor else { continue };
            let Some(id) = actor.id else { continue };
            match message.action.as_deref() {
                // A rename only changes the name kad shows.
                Some("create" | "rename") => {
                    // Only labelled containers are looked at further.
                    let labelled = actor
                        .attributes
                        .as_ref()
                        .is_some_and(|a| a.contains_key(annotation::KEY));
                    if labelled {
                        if let Some(event) = container_event(&docker, &id, driver).await? {
                            send(event).await?;
                        }
                    }
                }
                Some("destroy") => send(DockerEvent::Removed { id }).await?,
                _ => {}
            }
        }
        Err(WatchError::Ended)
    }
    .await;
    match result {
        Ok(()) => WatchError::Ended,
        Err(e) => e,
    }
}

/// The event of a labelled container, from its inspection (its cgroup parent is not in the
/// create event); None if it is gone already (its destroy event follows) or has no label.
async fn container_event(
    docker: &Docker,
    id: &str,
    driver: Driver,
) -> Result<Option<DockerEvent>, WatchError> {
    let inspected = match docker.inspect_container(id, None).await {
        Ok(inspected) => inspected,
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let Some(label) = inspected
        .config
        .and_then(|c| c.labels)
        .and_then(|mut l| l.remove(annotation::KEY))
    else {
        return Ok(None);
    };
    let id = inspected.id.unwrap_or_else(|| id.to_string());
    let parent = inspected
        .host_config
        .and_then(|h| h.cgroup_parent)
        .unwrap_or_default();
    let name = inspected
        .name
        .map(|n| n.trim_start_matches('/').to_string())
        .unwrap_or_else(|| id.chars().take(12).collect());
    Ok(Some(DockerEvent::Container {
        cgroup: driver.container_path(&id, &parent),
        id,
        name,
        label,
    }))
}
