//! The daemon's logic through the kernel seam ([`FakeKernel`]): precedence, anchors, undo,
//! adoption and the `kad exec` collector, with the policy tables and state files for real (in
//! a temporary directory that stands for the cgroup2 root) and neither root nor BPF needed.
use std::{
    path::PathBuf,
    sync::atomic::{AtomicUsize, Ordering},
};

use keepalive_common::FLAG_CONFIG;

use super::{settings::DaemonConfig, state::State};
use crate::{
    api::protocol::Response,
    containers::pods::KubeletLayout,
    daemon::reconcile::Source,
    host::{process::ExecOwner, watch::Watcher},
    kernel::{
        fake::{Call, FakeKernel},
        Kernel,
    },
    model::policy::Policy,
};

/// A directory of its own, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "kad-unit-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("temporary directory");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A daemon's state over a fake kernel: `root` stands for the cgroup2 root.
struct Daemon {
    dir: TempDir,
    root: PathBuf,
    kernel: FakeKernel,
    state: State,
    /// The watcher's inotify descriptor is registered with it; dropped last.
    _runtime: tokio::runtime::Runtime,
}

impl Daemon {
    fn start() -> Daemon {
        Daemon::start_with(TempDir::new(), FakeKernel::default())
    }

    fn start_with(dir: TempDir, kernel: FakeKernel) -> Daemon {
        let root = dir.0.join("cgroup");
        std::fs::create_dir_all(&root).expect("root");
        let config = DaemonConfig {
            socket: dir.0.join("kad.sock"),
            state_dir: dir.0.join("state"),
            bpffs: dir.0.join("bpffs"),
            config: dir.0.join("kad.toml"),
            metrics: None,
            pods: None,
            kubelet: KubeletLayout {
                systemd: false,
                cgroup_root: String::new(),
            },
        };
        let opened = kernel.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .expect("runtime");
        let _entered = runtime.enter();
        let state = State::start(
            config,
            root.clone(),
            Watcher::new().expect("inotify"),
            move |_| Ok(Box::new(opened) as Box<dyn Kernel>),
        )
        .expect("start");
        drop(_entered);
        Daemon {
            dir,
            root,
            kernel,
            state,
            _runtime: runtime,
        }
    }

    /// Stops this daemon and starts another on the same directories and kernel.
    fn restart(self) -> Daemon {
        let Daemon {
            dir, kernel, state, ..
        } = self;
        drop(state); // its lock on the state directory

        Daemon::start_with(dir, kernel)
    }

    fn mkdir(&self, relative: &str) -> PathBuf {
        let path = self.root.join(relative);
        std::fs::create_dir_all(&path).expect("mkdir");
        path
    }

    fn set(&mut self, relative: &str, idle: u32) -> Response {
        let policy = Policy::on(Some(idle), None, None).expect("policy");
        self.state.set_path(self.root.join(relative), policy)
    }

    /// The idle time the kernel holds for a path ("/a/b"), if any.
    fn kernel_idle(&self, key: &str) -> Option<u32> {
        self.kernel.held().paths.get(key).map(|v| v.idle)
    }

    fn anchors(&self) -> Vec<String> {
        self.kernel
            .held()
            .anchors
            .values()
            .map(|p| p.strip_prefix(&self.root).unwrap().display().to_string())
            .collect()
    }
}

fn done(response: Response) {
    assert!(
        matches!(response, Response::Done { .. }),
        "expected done: {response:?}"
    );
}

fn error(response: Response) -> String {
    match response {
        Response::Error { message } => message,
        other => panic!("expected an error: {other:?}"),
    }
}

#[test]
fn set_wins_over_pods_which_win_over_the_config_file() {
    let dir = TempDir::new();
    std::fs::write(
        dir.0.join("kad.toml"),
        "[[policy]]\ncgroup = \"app\"\nidle = 100\n",
    )
    .unwrap();
    let mut d = Daemon::start_with(dir, FakeKernel::default());
    let app = d.root.join("app");
    let config_value = d.kernel.held().paths["/app"];
    assert_eq!(config_value.idle, 100);
    assert_ne!(
        config_value.flags & FLAG_CONFIG,
        0,
        "marked as the config's"
    );

    let pod = Policy::on(Some(200), None, None).unwrap();
    d.state
        .from_pods
        .insert(app.clone(), (pod, "default/web".into()));
    d.state.sync_path(&app).unwrap();
    assert_eq!(
        d.kernel_idle("/app"),
        Some(200),
        "a pod wins over the config"
    );

    done(d.set("app", 300));
    assert_eq!(d.kernel_idle("/app"), Some(300), "kad set wins over a pod");
    assert_eq!(d.state.want(&app).map(|(_, s)| s), Some(Source::Set));
    assert_eq!(
        d.kernel.held().paths["/app"].flags & FLAG_CONFIG,
        0,
        "no longer the config's"
    );

    done(d.state.unset_path(app.clone()));
    assert_eq!(
        d.kernel_idle("/app"),
        Some(200),
        "unset gives it back to the pod"
    );
    d.state.from_pods.remove(&app);
    d.state.sync_path(&app).unwrap();
    assert_eq!(
        d.kernel_idle("/app"),
        Some(100),
        "and then to the config file"
    );
    let message = error(d.state.unset_path(app));
    assert!(message.contains("comes from"), "{message}");
    assert_eq!(
        d.kernel_idle("/app"),
        Some(100),
        "a refused unset changes nothing"
    );
}

#[test]
fn programs_hang_from_the_parent_and_once_per_subtree_never_from_the_root() {
    let mut d = Daemon::start();
    d.mkdir("a/b");
    d.mkdir("a/c");
    d.mkdir("x");
    done(d.set("a/b", 100));
    done(d.set("a/c", 100));
    assert_eq!(
        d.anchors(),
        vec!["a"],
        "siblings share their parent's anchor"
    );
    done(d.set("x", 100));
    let mut anchors = d.anchors();
    anchors.sort();
    assert_eq!(
        anchors,
        vec!["a", "x"],
        "a child of the root is its own anchor"
    );
    done(d.set("a", 100));
    assert_eq!(d.anchors().len(), 2, "a/b and a/c are covered by a");

    // A policy waiting for its cgroup hangs from the nearest existing ancestor.
    done(d.set("q/r/s", 100));
    assert!(
        !d.anchors().iter().any(|a| a.starts_with('q')),
        "q does not exist: {:?}",
        d.anchors()
    );
    assert!(
        d.kernel.held().paths.contains_key("/q/r/s"),
        "waiting by path"
    );

    for path in ["a/b", "a/c", "a", "x", "q/r/s"] {
        done(d.state.unset_path(d.root.join(path)));
    }
    assert!(d.anchors().is_empty(), "no policy, no anchor");
    assert!(d.kernel.held().paths.is_empty());
    assert!(d.kernel.held().ids.is_empty());
}

#[test]
fn a_set_the_kernel_refuses_changes_nothing() {
    let mut d = Daemon::start();
    d.mkdir("app");
    done(d.set("app", 100));
    d.kernel.held().refuse_puts = true;
    error(d.set("app", 200));
    assert_eq!(d.kernel_idle("/app"), Some(100));
    let policy = d.state.set[&d.root.join("app")];
    assert_eq!(policy.idle, Some(100), "the table is as it was");
    error(d.set("other", 200));
    assert!(!d.state.set.contains_key(&d.root.join("other")));
    d.kernel.held().refuse_puts = false;
    let d = d.restart();
    assert_eq!(d.state.set.len(), 1, "only what was done was saved");
}

#[test]
fn a_set_that_cannot_be_saved_is_taken_back_from_the_kernel() {
    let mut d = Daemon::start();
    d.mkdir("app");
    done(d.set("app", 100));
    // The state directory becomes a file: the journal cannot be opened.
    let state_dir = d.dir.0.join("state");
    std::fs::rename(&state_dir, d.dir.0.join("state.away")).unwrap();
    std::fs::write(&state_dir, "not a directory").unwrap();
    error(d.set("app", 200));
    assert_eq!(
        d.kernel_idle("/app"),
        Some(100),
        "the kernel is back as it was"
    );
    error(d.set("new", 300));
    assert_eq!(d.kernel_idle("/new"), None, "a new path is taken back");
    let message = error(d.state.unset_path(d.root.join("app")));
    assert!(message.contains("the policy stays"), "{message}");
    assert_eq!(d.kernel_idle("/app"), Some(100), "still in force");
}

#[test]
fn pinned_policies_missing_from_the_state_file_are_adopted_and_saved() {
    let mut d = Daemon::start();
    d.mkdir("app");
    done(d.set("app", 100));
    // The state directory is lost; the kernel (pins) still holds the policy.
    std::fs::remove_dir_all(d.dir.0.join("state")).unwrap();
    let d = d.restart();
    assert_eq!(
        d.state.set.get(&d.root.join("app")).and_then(|p| p.idle),
        Some(100),
        "adopted"
    );
    assert_eq!(d.kernel_idle("/app"), Some(100), "never dropped");
    let d = d.restart();
    assert!(d.state.set.contains_key(&d.root.join("app")), "and saved");
}

#[test]
fn pinned_config_policies_go_when_the_config_file_drops_them() {
    let dir = TempDir::new();
    let config = dir.0.join("kad.toml");
    std::fs::write(&config, "[[policy]]\ncgroup = \"app\"\nidle = 100\n").unwrap();
    let d = Daemon::start_with(dir, FakeKernel::default());
    assert_eq!(d.kernel_idle("/app"), Some(100));
    std::fs::write(&config, "").unwrap();
    let d = d.restart();
    assert_eq!(
        d.kernel_idle("/app"),
        None,
        "removed on purpose: not adopted"
    );
    assert!(d.state.set.is_empty());
}

#[test]
fn a_missing_config_file_keeps_its_policies() {
    let dir = TempDir::new();
    let config = dir.0.join("kad.toml");
    std::fs::write(&config, "[[policy]]\ncgroup = \"app\"\nidle = 100\n").unwrap();
    let d = Daemon::start_with(dir, FakeKernel::default());
    std::fs::remove_file(&config).unwrap();
    let mut d = d.restart();
    assert_eq!(d.kernel_idle("/app"), Some(100), "kept in force");
    let message = error(d.state.reload());
    assert!(message.contains("does not exist"), "{message}");
    assert_eq!(
        d.kernel_idle("/app"),
        Some(100),
        "a refused reload changes nothing"
    );
}

#[test]
fn a_re_created_cgroup_gets_its_policy_under_its_new_id() {
    let mut d = Daemon::start();
    let app = d.mkdir("app");
    done(d.set("app", 100));
    let old_id = crate::host::cgroup::id_of(&app).unwrap();
    assert!(d.kernel.held().ids.contains_key(&old_id));
    std::fs::remove_dir(&app).unwrap();
    // Another directory first, so the new one cannot reuse the inode number.
    let _other = d.mkdir("other");
    d.mkdir("app");
    let new_id = crate::host::cgroup::id_of(&app).unwrap();
    assert_ne!(old_id, new_id);
    d.state.sync_path(&app).unwrap();
    let held = d.kernel.held();
    assert!(!held.ids.contains_key(&old_id), "the old id is forgotten");
    assert_eq!(held.ids.get(&new_id).map(|v| v.idle), Some(100));
}

#[test]
fn abandoned_exec_runs_are_collected_and_live_ones_kept() {
    let mut d = Daemon::start();
    let gone = d.mkdir("kad-exec-1");
    let live = d.mkdir("kad-exec-2");
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let owner = ExecOwner::of(child.id()).unwrap();
    child.wait().unwrap();
    let policy = Policy::on(Some(100), None, None).unwrap();
    d.state.exec_owners.insert(gone.clone(), owner);
    done(d.state.set_path(gone.clone(), policy));
    d.state
        .exec_owners
        .insert(live.clone(), ExecOwner::of(std::process::id()).unwrap());
    done(d.state.set_path(live.clone(), policy));
    d.kernel.take_calls();

    assert!(d.state.collect_abandoned());
    assert!(!d.state.set.contains_key(&gone), "its policy is removed");
    assert!(!gone.exists(), "and its cgroup");
    assert!(
        d.state.set.contains_key(&live),
        "a live run keeps its policy"
    );
    assert!(live.exists());
    let calls = d.kernel.take_calls();
    assert!(
        calls.contains(&Call::RemovePath("/kad-exec-1".into())),
        "{calls:?}"
    );
    assert!(!d.state.collect_abandoned(), "nothing more to collect");
    let d = d.restart();
    assert!(!d.state.set.contains_key(&gone), "the removal was saved");
    assert!(d.state.set.contains_key(&live));
}

/// The OCI hook's life of a container's policy: set with the container's id; at a stop it
/// stays (the path keeps its entry, so its counters slot) while the bundle exists; the
/// bundle's removal (the container's) removes it; all of it saved.
#[test]
fn a_stopped_containers_policy_stays_until_the_container_is_removed() {
    let mut d = Daemon::start();
    let id = "ab".repeat(32);
    let cgroup = format!("parent/libpod-{id}");
    let path = d.mkdir(&cgroup);
    let bundle = d.dir.0.join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    let policy = Policy::on(Some(100), None, None).unwrap();
    done(d.state.set_for(&cgroup, policy, Some(id.clone())));
    assert_eq!(d.state.container_of(&path), Some((id.clone(), false)));

    // A stop: the runtime removes the cgroup, poststop says so.
    std::fs::remove_dir(&path).unwrap();
    done(
        d.state
            .container_stopped(&cgroup, &id, &bundle.display().to_string()),
    );
    assert!(d.state.set.contains_key(&path), "the policy stays");
    assert_eq!(d.state.container_of(&path), Some((id.clone(), true)));
    let key = format!("/parent/libpod-{id}");
    assert_eq!(d.kernel_idle(&key), Some(100), "the path keeps its entry");
    assert_eq!(d.state.stopped_containers(), 1);
    assert!(!d.state.collect_removed_containers(), "the bundle is there");

    // Saved with the container and its bundle; a restarted daemon goes on.
    let mut d = d.restart();
    assert_eq!(d.state.container_of(&path), Some((id.clone(), true)));
    // Started again: createRuntime sets it anew, no longer stopped.
    d.mkdir(&cgroup);
    done(d.state.set_for(&cgroup, policy, Some(id.clone())));
    assert_eq!(d.state.container_of(&path), Some((id.clone(), false)));
    std::fs::remove_dir(&path).unwrap();
    done(
        d.state
            .container_stopped(&cgroup, &id, &bundle.display().to_string()),
    );

    // Removed: the bundle goes, the policy with it.
    std::fs::remove_dir_all(&bundle).unwrap();
    assert!(d.state.collect_removed_containers());
    assert!(!d.state.set.contains_key(&path));
    assert_eq!(d.kernel_idle(&key), None);
    assert_eq!(d.state.stopped_containers(), 0);
    let mut d = d.restart();
    assert!(!d.state.set.contains_key(&path), "the removal was saved");

    // Another container's poststop, a bundle the daemon cannot see, a policy of no
    // container: removed at once, as before.
    for (owner, stopped_by, bundle) in [
        (Some(id.clone()), "cd".repeat(32), "/nonexistent/bundle"),
        (Some(id.clone()), id.clone(), "/nonexistent/bundle"),
        (None, id.clone(), "/tmp"),
    ] {
        d.mkdir(&cgroup);
        done(d.state.set_for(&cgroup, policy, owner));
        done(d.state.container_stopped(&cgroup, &stopped_by, bundle));
        assert!(!d.state.set.contains_key(&path), "{stopped_by} {bundle}");
    }
    // A `kad set` without a container makes the path's policy the user's.
    done(d.state.set_for(&cgroup, policy, Some(id.clone())));
    done(d.state.set_for(&cgroup, policy, None));
    assert_eq!(d.state.container_of(&path), None);
}
