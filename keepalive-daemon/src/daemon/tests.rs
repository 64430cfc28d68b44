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
            private_bpffs: false,
            config: dir.0.join("kad.toml"),
            metrics: None,
            metrics_policies: crate::daemon::metrics::DEFAULT_POLICY_SERIES,
            pods: None,
            docker: None,
            kubelet: KubeletLayout {
                systemd: false,
                cgroup_root: String::new(),
            },
            user_policy_limit: 2,
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
fn a_state_directory_removed_while_running_is_written_again_whole() {
    let mut d = Daemon::start();
    for i in 0..4 {
        d.mkdir(&format!("app{i}"));
        done(d.set(&format!("app{i}"), 100 + i));
    }
    std::fs::write(
        d.dir.0.join("kad.toml"),
        "[[policy]]\ncgroup = \"conf\"\nidle = 50\n",
    )
    .unwrap();
    assert!(matches!(
        d.state.reload(),
        Response::Reloaded { policies: 1 }
    ));
    std::fs::remove_dir_all(d.dir.0.join("state")).unwrap();
    // The next change finds the directory gone: every policy is written again, not only it.
    done(d.set("app4", 104));
    // A crash and a reboot: nothing pinned survives, the state directory is all there is.
    let Daemon { dir, state, .. } = d;
    drop(state);
    std::fs::remove_file(dir.0.join("kad.toml")).unwrap();
    let d = Daemon::start_with(dir, FakeKernel::default());
    assert_eq!(d.state.set.len(), 5, "{:?}", d.state.set.keys());
    assert_eq!(d.kernel_idle("/app0"), Some(100));
    assert_eq!(d.kernel_idle("/app4"), Some(104));
    assert_eq!(d.kernel_idle("/conf"), Some(50), "the config copy too");
}

#[test]
fn a_reload_the_kernel_cannot_hold_whole_changes_nothing() {
    let dir = TempDir::new();
    let config = dir.0.join("kad.toml");
    std::fs::write(&config, "[[policy]]\ncgroup = \"app\"\nidle = 100\n").unwrap();
    let mut d = Daemon::start_with(dir, FakeKernel::default());
    done(d.set("mine", 50));
    // One more than the map holds, with the policy set above.
    let max = keepalive_common::MAX_POLICIES as usize;
    let mut big = String::new();
    for i in 0..max {
        big.push_str(&format!("[[policy]]\ncgroup = \"p{i}\"\nidle = 200\n"));
    }
    std::fs::write(&config, &big).unwrap();
    let message = error(d.state.reload());
    assert!(
        message.contains("at most 65536") && message.contains("previous config stays"),
        "{message}"
    );
    assert_eq!(d.state.from_config.len(), 1, "the previous config stays");
    assert_eq!(d.kernel_idle("/app"), Some(100));
    assert_eq!(d.kernel_idle("/p0"), None, "nothing of the new one");
    // A policy the kernel refuses: the reload is taken back whole.
    std::fs::write(
        &config,
        "[[policy]]\ncgroup = \"app\"\nidle = 300\n[[policy]]\ncgroup = \"b\"\nidle = 400\n",
    )
    .unwrap();
    d.kernel.held().refuse_puts = true;
    let message = error(d.state.reload());
    assert!(message.contains("previous config stays"), "{message}");
    d.kernel.held().refuse_puts = false;
    assert_eq!(
        d.kernel_idle("/app"),
        Some(100),
        "the previous policy is in force"
    );
    assert_eq!(d.kernel_idle("/b"), None);
    assert_eq!(d.state.from_config[&d.root.join("app")].idle, Some(100));
    assert!(matches!(
        d.state.reload(),
        Response::Reloaded { policies: 2 }
    ));
    assert_eq!(d.kernel_idle("/app"), Some(300));
}

#[test]
fn a_reload_leaves_unchanged_policies_untouched() {
    let dir = TempDir::new();
    let config = dir.0.join("kad.toml");
    std::fs::write(
        &config,
        "[[policy]]\ncgroup = \"keep\"\nidle = 100\n[[policy]]\ncgroup = \"edit\"\nidle = 1\n",
    )
    .unwrap();
    let mut d = Daemon::start_with(dir, FakeKernel::default());
    d.mkdir("keep");
    d.kernel.take_calls();
    std::fs::write(
        &config,
        "[[policy]]\ncgroup = \"keep\"\nidle = 100\n[[policy]]\ncgroup = \"edit\"\nidle = 2\n",
    )
    .unwrap();
    assert!(matches!(
        d.state.reload(),
        Response::Reloaded { policies: 2 }
    ));
    let calls = d.kernel.take_calls();
    assert!(
        !calls.iter().any(|c| format!("{c:?}").contains("/keep")),
        "the unchanged policy is neither removed nor put again: {calls:?}"
    );
    assert_eq!(d.kernel_idle("/edit"), Some(2));
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
    // Moved away rather than removed: while the old directory lives, the new one cannot
    // reuse its inode number (a cgroup's id).
    std::fs::rename(&app, d.root.join("app.old")).unwrap();
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
    done(d.state.set_for(&cgroup, policy, Some(id.clone()), 0));
    assert_eq!(d.state.container_of(&path), Some((id.clone(), false)));

    // A stop: the runtime removes the cgroup, poststop says so.
    std::fs::remove_dir(&path).unwrap();
    done(
        d.state
            .container_stopped(&cgroup, &id, &bundle.display().to_string(), 0),
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
    done(d.state.set_for(&cgroup, policy, Some(id.clone()), 0));
    assert_eq!(d.state.container_of(&path), Some((id.clone(), false)));
    std::fs::remove_dir(&path).unwrap();
    done(
        d.state
            .container_stopped(&cgroup, &id, &bundle.display().to_string(), 0),
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
        done(d.state.set_for(&cgroup, policy, owner, 0));
        done(d.state.container_stopped(&cgroup, &stopped_by, bundle, 0));
        assert!(!d.state.set.contains_key(&path), "{stopped_by} {bundle}");
    }
    // A `kad set` without a container makes the path's policy the user's.
    done(d.state.set_for(&cgroup, policy, Some(id.clone()), 0));
    done(d.state.set_for(&cgroup, policy, None, 0));
    assert_eq!(d.state.container_of(&path), None);
}

#[test]
fn the_host_policy_is_the_one_anchor_while_it_exists() {
    let mut d = Daemon::start();
    d.mkdir("a/b");
    d.mkdir("x");
    done(d.set("a/b", 100));
    done(d.set("x", 100));
    assert!(
        !d.anchors().contains(&String::new()),
        "nothing at the root yet"
    );
    assert_eq!(d.anchors().len(), 2);

    let root = d.root.clone();
    done(
        d.state
            .set_path(root.clone(), Policy::on(Some(300), None, None).unwrap()),
    );
    assert_eq!(
        d.anchors(),
        vec![""],
        "only the root: a socket runs kad's programs once"
    );
    assert_eq!(d.kernel_idle("/"), Some(300), "kept by the root's path");
    let root_id = crate::host::cgroup::id_of(&root).unwrap();
    assert_eq!(d.kernel.held().ids.get(&root_id).map(|v| v.idle), Some(300));
    assert_eq!(d.kernel_idle("/a/b"), Some(100), "nearer policies stay");

    let d = d.restart();
    assert_eq!(d.anchors(), vec![""], "saved and restored");
    assert!(d.state.set.contains_key(&d.root), "the state file keeps it");

    let mut d = d;
    done(d.state.unset_path(d.root.clone()));
    let mut anchors = d.anchors();
    anchors.sort();
    assert_eq!(
        anchors,
        vec!["a", "x"],
        "the root is left, the others are back"
    );
    assert_eq!(d.kernel_idle("/"), None);
    let message = error(d.state.unset_path(d.root.clone()));
    assert!(message.contains("no host policy"), "{message}");
}

#[test]
fn the_host_policy_comes_from_the_config_file_too() {
    let dir = TempDir::new();
    std::fs::write(
        dir.0.join("kad.toml"),
        "[[policy]]\nhost = true\nidle = 400\n",
    )
    .unwrap();
    let d = Daemon::start_with(dir, FakeKernel::default());
    assert_eq!(d.kernel_idle("/"), Some(400));
    assert_eq!(d.anchors(), vec![""]);
    assert_ne!(d.kernel.held().paths["/"].flags & FLAG_CONFIG, 0);
}

/// Gives `path` (a directory standing for a cgroup) to `uid` as systemd's `Delegate=` does:
/// the directory and its `cgroup.procs`.
fn delegate(path: &std::path::Path, uid: u32) {
    use std::os::unix::fs::chown;
    let procs = path.join("cgroup.procs");
    std::fs::write(&procs, "").unwrap();
    chown(path, Some(uid), Some(uid)).unwrap();
    chown(&procs, Some(uid), Some(uid)).unwrap();
}

#[test]
fn users_manage_policies_only_in_the_cgroups_delegated_to_them() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: giving a directory to another user needs root");
        return;
    }
    const USER: u32 = 65534;
    let mut d = Daemon::start();
    let delegated = d.mkdir("user.slice/u");
    delegate(&delegated, USER);
    d.mkdir("other");
    let user_set = |d: &mut Daemon, relative: &str, policy: Policy| {
        let path = d.root.join(relative).display().to_string();
        d.state.set(&path, policy, USER)
    };
    let on = Policy::on(Some(100), None, None).unwrap();
    done(d.set("user.slice", 200));

    done(user_set(&mut d, "user.slice/u/app", Policy::OFF));
    let value = d.kernel.held().paths["/user.slice/u/app"];
    assert_eq!(
        Policy::from_value(&value),
        Policy::OFF,
        "a user opts their own programs out below root's policy"
    );
    done(user_set(&mut d, "user.slice/u/later/deeper", on));

    for (relative, expected) in [
        ("other", "not in a cgroup delegated to uid 65534"),
        ("user.slice", "not in a cgroup delegated"),
    ] {
        let message = error(user_set(&mut d, relative, on));
        assert!(message.contains(expected), "{relative}: {message}");
    }
    let locked = Policy { locked: true, ..on };
    let message = error(user_set(&mut d, "user.slice/u/x", locked));
    assert!(message.contains("only root"), "{message}");
    let message = error(user_set(&mut d, "user.slice/u/third", on));
    assert!(
        message.contains("--user-policy-limit 2"),
        "the limit is named: {message}"
    );
    assert!(!d.kernel.held().paths.contains_key("/user.slice/u/third"));

    let root_path = d.root.join("user.slice").display().to_string();
    let message = error(d.state.unset(&root_path, USER));
    assert!(
        message.contains("set no policy"),
        "root's policy stays: {message}"
    );
    assert_eq!(d.kernel_idle("/user.slice"), Some(200));

    // Root locks the subtree: the user's new policies below it are refused.
    done(
        d.state
            .set_path(d.root.join("user.slice"), Policy { locked: true, ..on }),
    );
    done(
        d.state.unset(
            &d.root
                .join("user.slice/u/later/deeper")
                .display()
                .to_string(),
            USER,
        ),
    );
    let message = error(user_set(&mut d, "user.slice/u/new", Policy::OFF));
    assert!(message.contains("locked by root"), "{message}");

    // Who set what is saved: after a restart the user still owns theirs, and only theirs.
    let mut d = d.restart();
    let app = d.root.join("user.slice/u/app").display().to_string();
    done(d.state.unset(&app, USER));
    assert!(!d.kernel.held().paths.contains_key("/user.slice/u/app"));
}

#[test]
fn docker_labels_are_policies_until_the_container_is_removed() {
    use crate::containers::docker::{DockerEvent, Driver};
    let mut d = Daemon::start();
    d.state.docker_status = Some(crate::api::protocol::DockerStatus {
        socket: "/var/run/docker.sock".into(),
        connected: false,
        error: None,
        api: None,
        cgroup_driver: None,
        containers: 0,
        invalid: Vec::new(),
    });
    d.mkdir("docker");
    let id = |c: char| c.to_string().repeat(64);
    let created = |c: char, label: &str| DockerEvent::Container {
        id: id(c),
        name: format!("web-{c}"),
        cgroup: Driver::Cgroupfs.container_path(&id(c), ""),
        label: label.into(),
    };
    d.state.on_docker_event(DockerEvent::Connection {
        ok: true,
        message: None,
        api: Some("1.41".into()),
        driver: Some(Driver::Cgroupfs),
    });
    // Created, not started: the policy waits at the path the cgroup will have.
    d.state.on_docker_event(created('a', "idle=180,cnt=5"));
    let a = format!("/docker/{}", id('a'));
    assert_eq!(d.kernel_idle(&a), Some(180));
    let a_path = d.root.join(&a[1..]);
    assert_eq!(
        (
            d.state.want(&a_path).map(|(_, s)| s),
            d.state.docker_of(&a_path, Source::Docker)
        ),
        (Some(Source::Docker), Some("web-a".to_string()))
    );
    // A bad label: no policy; the status names the container and the label.
    d.state.on_docker_event(created('b', "idle=0"));
    let status = d.state.docker_status.clone().unwrap();
    assert_eq!((status.connected, status.containers), (true, 2));
    assert_eq!(status.invalid.len(), 1, "{status:?}");
    assert!(
        status.invalid[0].contains("web-b")
            && status.invalid[0].contains("label kad.dev/keepalive"),
        "{status:?}"
    );
    assert_eq!(d.kernel.held().paths.len(), 1);
    // Saved: a restart keeps it before any event.
    let d = d.restart();
    assert_eq!(d.kernel_idle(&a), Some(180));
    let mut d = d;
    assert_eq!(
        d.state.docker_of(&a_path, Source::Docker),
        Some("web-a".to_string())
    );
    // The first full list after the restart names only c: a goes, c comes.
    d.state.on_docker_event(DockerEvent::ListStart);
    d.state.on_docker_event(created('c', "off"));
    d.state.on_docker_event(DockerEvent::ListDone);
    assert_eq!(d.kernel_idle(&a), None);
    let c = format!("/docker/{}", id('c'));
    assert!(d.kernel.held().paths.contains_key(c.as_str()));
    // docker rm.
    d.state
        .on_docker_event(DockerEvent::Removed { id: id('c') });
    assert!(d.kernel.held().paths.is_empty());
    assert!(d.state.from_docker.is_empty());
}

/// The hook of rootless podman runs as the user: a container's policy in a cgroup delegated to
/// them is theirs (relative paths resolved below the daemon's root before the check), kept at a
/// stop when the bundle is theirs too, and only they (or root) may stop or remove it.
#[test]
fn a_users_container_policy_follows_the_delegation_rules() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: giving a directory to another user needs root");
        return;
    }
    const USER: u32 = 65534;
    let mut d = Daemon::start();
    delegate(&d.mkdir("user.slice/u"), USER);
    let id = "cd".repeat(32);
    let cgroup = format!("user.slice/u/libpod-{id}");
    // The cgroup the runtime made as the user is theirs, as the kernel makes it.
    let path = d.mkdir(&cgroup);
    delegate(&path, USER);
    let policy = Policy::on(Some(120), None, None).unwrap();

    // Not delegated: refused, container or not.
    d.mkdir("other");
    let message = error(
        d.state
            .set_for("other/libpod-x", policy, Some(id.clone()), USER),
    );
    assert!(message.contains("not in a cgroup delegated"), "{message}");
    assert_eq!(d.state.container_of(&d.root.join("other/libpod-x")), None);

    done(d.state.set_for(&cgroup, policy, Some(id.clone()), USER));
    assert_eq!(d.state.owners.get(&path), Some(&USER));
    assert_eq!(d.state.container_of(&path), Some((id.clone(), false)));

    // Another user's poststop for it: refused, the policy stays.
    let bundle = d.dir.0.join("user-bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    std::os::unix::fs::chown(&bundle, Some(USER), Some(USER)).unwrap();
    let message =
        error(
            d.state
                .container_stopped(&cgroup, &id, &bundle.display().to_string(), USER - 1),
        );
    assert!(message.contains("permission denied"), "{message}");
    assert!(d.state.set.contains_key(&path));

    // The user's poststop with their bundle: kept, saved with who set it.
    done(
        d.state
            .container_stopped(&cgroup, &id, &bundle.display().to_string(), USER),
    );
    assert_eq!(d.state.container_of(&path), Some((id.clone(), true)));
    let mut d = d.restart();
    assert_eq!(d.state.owners.get(&path), Some(&USER));
    assert_eq!(d.state.container_of(&path), Some((id.clone(), true)));

    // Started again, then stopped with a bundle that is not theirs: removed at once.
    done(d.state.set_for(&cgroup, policy, Some(id.clone()), USER));
    let roots = d.dir.0.display().to_string();
    done(d.state.container_stopped(&cgroup, &id, &roots, USER));
    assert!(!d.state.set.contains_key(&path));
    assert_eq!(d.state.owners.get(&path), None);
    assert_eq!(d.state.container_of(&path), None);
}

#[test]
fn metrics_say_which_policies_are_not_in_force_and_why() {
    let dir = TempDir::new();
    std::fs::write(
        dir.0.join("kad.toml"),
        "[[policy]]\ncgroup = \"full\"\nidle = 100\n",
    )
    .unwrap();
    std::fs::create_dir_all(dir.0.join("cgroup/full")).unwrap();
    // The kernel's maps are full when the config file's policy is applied.
    let kernel = FakeKernel::default();
    kernel.held().refuse_puts = true;
    let mut d = Daemon::start_with(dir, kernel);
    d.kernel.held().refuse_puts = false;
    d.mkdir("ok");
    done(d.set("ok", 60));
    done(d.set("later", 60));
    let text = d.state.snapshot().metrics(&d.kernel, 10);
    let root = d.root.display();
    for line in [
        format!("kad_policy_in_force{{cgroup=\"{root}/full\",state=\"too_many_policies\"}} 0\n"),
        format!("kad_policy_in_force{{cgroup=\"{root}/later\",state=\"waiting\"}} 0\n"),
        format!("kad_policy_in_force{{cgroup=\"{root}/ok\",state=\"in_force\"}} 1\n"),
        "kad_policies_by_state{state=\"too_many_policies\"} 1\n".into(),
        "kad_policies_by_state{state=\"waiting\"} 1\n".into(),
        "kad_policies_by_state{state=\"in_force\"} 1\n".into(),
        "kad_policies_by_state{state=\"failed\"} 0\n".into(),
        "kad_policies 3\n".into(),
        "kad_policy_series_omitted 0\n".into(),
    ] {
        assert!(text.contains(&line), "{line:?} in:\n{text}");
    }
    // Past the cap: the first policy in path order keeps its series, the counts stay whole.
    let text = d.state.snapshot().metrics(&d.kernel, 1);
    assert_eq!(text.matches("kad_policy_in_force{").count(), 1, "{text}");
    assert!(text.contains("kad_policy_series_omitted 2\n"), "{text}");
    assert!(text.contains("kad_policies_by_state{state=\"waiting\"} 1\n"));
}

#[test]
fn an_anchor_made_again_at_its_path_is_attached_again() {
    let mut d = Daemon::start();
    d.mkdir("x/mid/app");
    done(d.set("x/mid/app", 100));
    let mid = d.root.join("x/mid");
    let id_of = |p: &std::path::Path| crate::host::cgroup::id_of(p).expect("id");
    let old = id_of(&mid);
    assert_eq!(
        d.kernel.held().anchors.keys().copied().collect::<Vec<_>>(),
        [old]
    );
    // Removed and made again before the daemon looked: the same path, a new directory (kept
    // alive meanwhile, so that the new one cannot reuse its inode).
    let kept = d.root.join("kept");
    std::fs::rename(&mid, &kept).expect("move the old anchor away");
    d.mkdir("x/mid/app");
    let new = id_of(&mid);
    assert_ne!(old, new);
    d.state.on_cgroup_events(std::slice::from_ref(&mid));
    assert_eq!(
        d.kernel.held().anchors.keys().copied().collect::<Vec<_>>(),
        [new],
        "attached to the new cgroup, the old one detached"
    );
    // A link that no longer holds its cgroup (what the kernel says once the cgroup is gone,
    // also when its id was given to the cgroup there now) is found at the next `kad set`.
    d.kernel.held().dead.insert(new);
    d.mkdir("x/mid/other");
    done(d.set("x/mid/other", 100));
    assert!(
        d.kernel.held().calls.contains(&Call::Reattach(new)),
        "{:?}",
        d.kernel.held().calls
    );
    assert!(d.kernel.held().dead.is_empty());
    // An anchor that cannot be attached makes the policies below it not in force.
    d.kernel.held().refuse_anchors.push(mid.clone());
    d.kernel.held().dead.insert(new);
    d.state.on_cgroup_events(std::slice::from_ref(&mid));
    let app = d.root.join("x/mid/app");
    let error = d.state.reconciler.failing(&app).expect("not in force");
    assert!(error.contains("refused by the test"), "{error}");
    // /metrics says so too, although the policy is in the map.
    let text = d.state.snapshot().metrics(&d.kernel, 10);
    let line = format!(
        "kad_policy_in_force{{cgroup=\"{}\",state=\"failed\"}} 0\n",
        app.display()
    );
    assert!(text.contains(&line), "{line:?} in:\n{text}");
}
