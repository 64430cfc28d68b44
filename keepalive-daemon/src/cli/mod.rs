//! The `kad` command line: `kad daemon` and the commands that talk to it.
pub mod audit;
pub mod exec;
pub mod inspect;
mod output;
pub mod probe;

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use crate::{
    api::client,
    api::protocol::{Request, Response},
    containers::oci,
    daemon::store,
    daemon::{self, DaemonConfig},
    host::cgroup,
    host::target,
    kernel::enforcer,
    model::policy::{self, Policy, CNT_RANGE, SECS_RANGE, USER_TIMEOUT_RANGE},
};

const DEFAULT_SOCKET: &str = "/run/kad/kad.sock";
const DEFAULT_STATE_DIR: &str = "/var/lib/kad";
const DEFAULT_BPFFS: &str = "/sys/fs/bpf/kad";

/// Per-cgroup TCP keepalive, set in the kernel for programs you cannot change.
#[derive(Debug, Parser)]
#[command(name = "kad", version, about, long_about = None)]
pub struct Cli {
    /// The daemon's control socket.
    #[arg(long, global = true, env = "KAD_SOCKET", default_value = DEFAULT_SOCKET, value_name = "PATH")]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load the BPF program and serve the control socket (runs in the foreground).
    Daemon(DaemonArgs),
    /// Set the keepalive policy of a cgroup and everything below it.
    Set(SetArgs),
    /// Remove a cgroup's policy (set with `kad set`).
    Unset(TargetArgs),
    /// Re-read the daemon's config file (as SIGHUP does).
    Reload,
    /// Detach everything kad attached and remove its pins (stop the daemon first).
    Uninstall(UninstallArgs),
    /// List the policies.
    List(JsonFlag),
    /// Show the daemon's state: program, kernel, cgroup2 root, policies.
    Status(JsonFlag),
    /// Show what the kernel program counted per policy cgroup.
    Stats(StatsArgs),
    /// Run a command in a transient cgroup with a keepalive policy (libkeepalive's variables
    /// KEEPIDLE, KEEPINTVL, KEEPCNT, TCP_USER_TIMEOUT, KEEPALIVE=off fill in what the flags do
    /// not give).
    Exec(ExecArgs),
    /// Open a TCP connection from here and print the keepalive settings it got.
    Probe(JsonFlag),
    /// List the established TCP connections of processes with their real keepalive state,
    /// marking those that differ from the policy in force.
    Inspect(InspectArgs),
    /// Per cgroup with established TCP connections: how many have keepalive off, how many
    /// differ from the policy in force, and which policy applies (read from the kernel).
    Audit(AuditArgs),
    /// An OCI runtime hook (hooks.d): reads the container's state on stdin and puts its
    /// kad.dev/keepalive annotation in force (createRuntime) or removes it (poststop).
    OciHook(OciHookArgs),
}

#[derive(Debug, Args)]
struct OciHookArgs {
    /// createRuntime (or prestart) or poststop; by default from the container's status.
    #[arg(value_name = "STAGE")]
    stage: Option<String>,
    /// Where the hook records, per container, the cgroup it gave a policy.
    #[arg(long, default_value = oci::DEFAULT_RUN_DIR, value_name = "DIR")]
    run_dir: PathBuf,
}

#[derive(Debug, Args)]
struct DaemonArgs {
    /// Where the policy table is saved.
    #[arg(long, default_value = DEFAULT_STATE_DIR, value_name = "DIR")]
    state_dir: PathBuf,
    /// The daemon's directory on the bpf filesystem (one per daemon).
    #[arg(long, default_value = DEFAULT_BPFFS, value_name = "DIR")]
    bpffs: PathBuf,
    /// Policies by path, in TOML; a missing file is an empty config.
    #[arg(long, default_value = "/etc/kad/kad.toml", value_name = "FILE")]
    config: PathBuf,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9977); off by default.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// Pods' kad.dev/keepalive annotations (or their namespace's) are policies on the pods'
    /// cgroups: watch this node's pods (kubeconfig from KUBECONFIG, or the service account).
    #[arg(long, conflicts_with = "pod_events")]
    kubernetes: bool,
    /// The node whose pods to watch.
    #[arg(long, env = "NODE_NAME", value_name = "NAME")]
    node_name: Option<String>,
    /// Read pod events (JSON lines, as the watcher makes them) from a file or FIFO instead.
    #[arg(long, value_name = "PATH")]
    pod_events: Option<PathBuf>,
    /// The kubelet's --cgroup-driver: where pod cgroups are.
    #[arg(long, value_name = "DRIVER", default_value = "systemd", value_parser = ["systemd", "cgroupfs"])]
    kubelet_cgroup_driver: String,
    /// The kubelet's --cgroup-root, relative to the cgroup2 root.
    #[arg(long, value_name = "PATH", default_value = "/")]
    kubelet_cgroup_root: String,
}

#[derive(Debug, Args)]
struct UninstallArgs {
    /// The daemon's directory on the bpf filesystem.
    #[arg(long, default_value = DEFAULT_BPFFS, value_name = "DIR")]
    bpffs: PathBuf,
    /// The daemon's state directory (removed only with --purge).
    #[arg(long, default_value = DEFAULT_STATE_DIR, value_name = "DIR")]
    state_dir: PathBuf,
    /// Also remove the saved policies.
    #[arg(long)]
    purge: bool,
}

/// Which cgroup: exactly one of --cgroup, --unit, --pid, --container.
#[derive(Debug, Args)]
#[group(skip)]
#[command(group(clap::ArgGroup::new("target").required(true).multiple(false).args(["cgroup", "unit", "pid", "container"])))]
struct TargetArgs {
    /// A cgroup: an absolute path on the cgroup2 filesystem, or a path relative to its root.
    #[arg(long, value_name = "CG")]
    cgroup: Option<String>,
    /// A systemd unit's cgroup (SLICE/NAME; a name without suffix is a .service).
    #[arg(long, value_name = "NAME")]
    unit: Option<String>,
    /// The slice of --unit.
    #[arg(long, value_name = "SLICE", conflicts_with_all = ["cgroup", "pid", "container"])]
    slice: Option<String>,
    /// The cgroup process N is in now (the policy stays with that cgroup's path).
    #[arg(long, value_name = "N")]
    pid: Option<u32>,
    /// A running container's cgroup, by its id or a unique prefix (podman, docker,
    /// containerd, CRI-O; cgroupfs or systemd driver).
    #[arg(long, value_name = "ID")]
    container: Option<String>,
}

impl TargetArgs {
    /// The cgroup as the daemon takes it: a path, absolute or relative to the cgroup2 root.
    fn resolve(&self) -> anyhow::Result<String> {
        if let Some(cgroup) = &self.cgroup {
            return Ok(cgroup.clone());
        }
        if let Some(unit) = &self.unit {
            return Ok(target::unit_path(unit, self.slice.as_deref())?);
        }
        let root = cgroup::find_root()?;
        if let Some(id) = &self.container {
            return Ok(target::container_path(&root, id)?.display().to_string());
        }
        let pid = self
            .pid
            .context("one of --cgroup, --unit, --pid, --container is required")?;
        Ok(target::pid_path(&root, pid)?.display().to_string())
    }
}

#[derive(Debug, Args)]
struct SetArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[command(flatten)]
    values: ValueArgs,
}

/// The policy's values, for `set` and `exec` (where libkeepalive's variables fill in the rest).
#[derive(Debug, Args)]
struct ValueArgs {
    /// Seconds of idle before the first probe (TCP_KEEPIDLE, 1..32767).
    #[arg(long, value_name = "SECS", value_parser = parse_idle, allow_negative_numbers = true)]
    idle: Option<u32>,
    /// Seconds between probes (TCP_KEEPINTVL, 1..32767).
    #[arg(long, value_name = "SECS", value_parser = parse_intvl, allow_negative_numbers = true)]
    intvl: Option<u32>,
    /// Unanswered probes before the connection is dropped (TCP_KEEPCNT, 1..127; ignored by
    /// the kernel when --user-timeout is set).
    #[arg(long, value_name = "N", value_parser = parse_cnt, allow_negative_numbers = true)]
    cnt: Option<u32>,
    /// Milliseconds unacknowledged data or unanswered probes may last before the connection
    /// is dropped (TCP_USER_TIMEOUT, 1..2147483647).
    #[arg(long, value_name = "MS", value_parser = parse_user_timeout, allow_negative_numbers = true)]
    user_timeout: Option<u32>,
    /// The policy wins: a program's own setsockopt of these options is rewritten to the
    /// policy's values (and succeeds).
    #[arg(long)]
    enforce: bool,
    /// Opt out: leave sockets as the application made them, even under a policy cgroup.
    #[arg(long, conflicts_with_all = ["idle", "intvl", "cnt", "user_timeout", "enforce"])]
    off: bool,
}

impl ValueArgs {
    fn flags(&self) -> exec::Flags {
        exec::Flags {
            idle: self.idle,
            intvl: self.intvl,
            cnt: self.cnt,
            user_timeout: self.user_timeout,
            enforce: self.enforce,
            off: self.off,
        }
    }
}

#[derive(Debug, Args)]
struct ExecArgs {
    #[command(flatten)]
    values: ValueArgs,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<std::ffi::OsString>,
}

#[derive(Debug, Args)]
struct InspectArgs {
    /// The processes of a cgroup (and below): given by path, by unit, or by one of its processes.
    #[command(flatten)]
    target: TargetArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct StatsArgs {
    /// Only the policies of this running container's cgroup (and below), by id or prefix.
    #[arg(long, value_name = "ID")]
    container: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct AuditArgs {
    /// Only this cgroup and the cgroups below it (default: the whole cgroup2 tree).
    #[arg(long, value_name = "CG")]
    cgroup: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct JsonFlag {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn parse_idle(text: &str) -> Result<u32, policy::PolicyError> {
    policy::parse_value("--idle", text, SECS_RANGE)
}
fn parse_intvl(text: &str) -> Result<u32, policy::PolicyError> {
    policy::parse_value("--intvl", text, SECS_RANGE)
}
fn parse_cnt(text: &str) -> Result<u32, policy::PolicyError> {
    policy::parse_value("--cnt", text, CNT_RANGE)
}
fn parse_user_timeout(text: &str) -> Result<u32, policy::PolicyError> {
    policy::parse_value("--user-timeout", text, USER_TIMEOUT_RANGE)
}

/// Parses the command line and runs it. Errors are one line on stderr.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help, --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("kad: {}", clap_error_line(&e.render().to_string()));
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kad: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// clap's message (and its tip, if any) without the usage and blank lines, on one line.
fn clap_error_line(rendered: &str) -> String {
    let line = rendered
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    line.trim_start_matches("error: ").to_string()
}

fn one_line(error: &anyhow::Error) -> String {
    // Library errors often print their source already: add a cause only if it is new.
    let mut text = String::new();
    for cause in error.chain().map(ToString::to_string) {
        if !text.contains(&cause) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&cause);
        }
    }
    text.replace('\n', " ")
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let socket = cli.socket;
    match cli.command {
        Command::Exec(args) => return run_exec(&socket, args),
        Command::OciHook(args) => oci_hook(&socket, &args)?,
        Command::Probe(flag) => {
            let state = probe::probe().context("cannot open a loopback connection")?;
            if flag.json {
                println!("{}", serde_json::to_string(&state)?);
            } else {
                print!("{}", state.text());
            }
        }
        Command::Inspect(args) => {
            // --pid N as for every command: the cgroup N is in, and so all of its processes.
            let root = cgroup::find_root()?;
            let path = args.target.resolve()?;
            let cg = match cgroup::resolve(&root, &path) {
                Err(cgroup::CgroupError::Root(root)) => anyhow::bail!(
                    "{} is the cgroup2 root, which holds every process of the host: name a cgroup below it",
                    root.display()
                ),
                other => other?,
            };
            let mut connections = inspect::inspect(&inspect::cgroup_pids(&cg.path))?;
            // Which policy is in force is the daemon's to say; the values are the kernel's,
            // shown without it too.
            let policies = match client::call(&socket, &Request::List) {
                Ok(Response::Policies { policies }) => Some(policies),
                Ok(other) => anyhow::bail!("unexpected reply to list: {other:?}"),
                Err(e) => {
                    eprintln!(
                        "kad: warning: cannot ask the daemon which policies are in force ({}): connections are not compared with them",
                        one_line(&anyhow::Error::new(e))
                    );
                    None
                }
            };
            inspect::annotate(&mut connections, &root, policies.as_deref());
            output::connections(&connections, args.json)?;
        }
        Command::Audit(args) => {
            let root = cgroup::find_root()?;
            let top = match &args.cgroup {
                None => root.clone(),
                Some(input) => match cgroup::resolve(&root, input) {
                    // The root is the default: naming it is allowed here, nothing is set.
                    Err(cgroup::CgroupError::Root(root)) => root,
                    other => other?.path,
                },
            };
            let policies = match client::call(&socket, &Request::List)
                .context("kad audit compares connections with the daemon's policies")?
            {
                Response::Policies { policies } => policies,
                other => anyhow::bail!("unexpected reply to list: {other:?}"),
            };
            output::audit(&audit::audit(&root, &top, &policies)?, args.json)?;
        }
        Command::Stats(args) => match client::call(&socket, &Request::Stats)? {
            Response::Stats {
                mut stats,
                kills_counted,
            } => {
                if let Some(id) = &args.container {
                    let path = target::container_path(&cgroup::find_root()?, id)?;
                    stats.retain(|row| std::path::Path::new(&row.cgroup).starts_with(&path));
                }
                output::stats(&stats, kills_counted, args.json)?
            }
            other => anyhow::bail!("unexpected reply to stats: {other:?}"),
        },
        Command::Daemon(args) => {
            let pods = match (args.kubernetes, args.pod_events) {
                (true, _) => {
                    let node = args.node_name.filter(|n| !n.trim().is_empty()).context(
                        "--kubernetes needs the node's name: --node-name NAME or NODE_NAME",
                    )?;
                    Some(daemon::PodSource::Kubernetes { node })
                }
                (false, Some(path)) => Some(daemon::PodSource::Events(path)),
                (false, None) => None,
            };
            let kubelet_root = &args.kubelet_cgroup_root;
            if kubelet_root.split('/').any(|c| c == "..") {
                anyhow::bail!("--kubelet-cgroup-root '{kubelet_root}' contains '..'");
            }
            run_daemon(DaemonConfig {
                socket,
                state_dir: args.state_dir,
                bpffs: args.bpffs,
                config: args.config,
                metrics: args.metrics,
                pods,
                kubelet: crate::containers::pods::KubeletLayout {
                    systemd: args.kubelet_cgroup_driver == "systemd",
                    cgroup_root: kubelet_root.trim_matches('/').to_string(),
                },
            })?
        }
        Command::Set(args) => {
            let values = &args.values;
            let policy = if values.off {
                Policy::OFF
            } else {
                Policy::on(values.idle, values.intvl, values.cnt)?
                    .with_extras(values.user_timeout, values.enforce)?
            };
            let request = Request::Set {
                cgroup: args.target.resolve()?,
                policy,
            };
            if let Response::Done { cgroup } = client::call(&socket, &request)? {
                println!("{cgroup}: {policy}");
            }
        }
        Command::Unset(args) => {
            let request = Request::Unset {
                cgroup: args.resolve()?,
            };
            if let Response::Done { cgroup } = client::call(&socket, &request)? {
                println!("{cgroup}: policy removed");
            }
        }
        Command::Reload => {
            if let Response::Reloaded { policies } = client::call(&socket, &Request::Reload)? {
                println!("config reloaded: {policies} policies from the config file");
            }
        }
        Command::Uninstall(args) => uninstall(&args)?,
        Command::List(flag) => match client::call(&socket, &Request::List)? {
            Response::Policies { policies } => output::policies(&policies, flag.json)?,
            other => anyhow::bail!("unexpected reply to list: {other:?}"),
        },
        Command::Status(flag) => match client::call(&socket, &Request::Status)? {
            Response::Status(report) => output::status(&report, flag.json)?,
            other => anyhow::bail!("unexpected reply to status: {other:?}"),
        },
    }
    Ok(ExitCode::SUCCESS)
}

/// `kad exec`: the command's exit status becomes ours (128+N when killed by signal N).
fn run_exec(socket: &std::path::Path, args: ExecArgs) -> anyhow::Result<ExitCode> {
    let policy = exec::policy_from(args.values.flags(), |name| std::env::var_os(name))?;
    let Some((program, program_args)) = args.command.split_first() else {
        anyhow::bail!("missing command: kad exec [OPTIONS] -- CMD [ARGS...]");
    };
    let finished = exec::run(socket, policy, program, program_args)?;
    if let Some(e) = &finished.spawn_error {
        eprintln!("kad: {}: {e}", program.to_string_lossy());
    }
    if let Some(e) = finished.cleanup_error {
        eprintln!(
            "kad: warning: the command is done, but its policy could not be removed ({}); the daemon removes it and the cgroup once it runs again",
            one_line(&anyhow::Error::new(e))
        );
    }
    Ok(ExitCode::from(finished.code))
}

/// `kad oci-hook`: a failure exits non-zero, which makes the runtime refuse to start the
/// container (at createRuntime) with this message.
fn oci_hook(socket: &std::path::Path, args: &OciHookArgs) -> anyhow::Result<()> {
    let state = oci::read_state(std::io::stdin().lock())?;
    match oci::run(socket, &args.run_dir, args.stage.as_deref(), &state)? {
        oci::Outcome::Applied { cgroup, policy } => println!("{cgroup}: {policy}"),
        oci::Outcome::Removed { cgroup } => println!("{cgroup}: policy removed"),
        oci::Outcome::NotAnnotated | oci::Outcome::NothingToRemove => {}
    }
    Ok(())
}

fn uninstall(args: &UninstallArgs) -> anyhow::Result<()> {
    if !crate::host::sys::is_root() {
        anyhow::bail!("kad uninstall must run as root");
    }
    let detached = enforcer::uninstall(&args.bpffs)?;
    println!(
        "detached {detached} cgroup attachments and removed {}",
        args.bpffs.display()
    );
    if args.purge {
        store::purge(&args.state_dir)?;
        println!("removed the saved policies in {}", args.state_dir.display());
    }
    Ok(())
}

fn run_daemon(config: DaemonConfig) -> anyhow::Result<()> {
    // Before anything is touched: on an older kernel every connection would fail to be set.
    crate::host::sys::check_kernel(&crate::host::sys::kernel_release())?;
    crate::host::logging::init();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(daemon::run(config))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("kad").chain(args.iter().copied()))
    }

    #[test]
    fn exactly_one_target() {
        assert!(parse(&["set", "--unit", "nginx"]).is_ok());
        assert!(parse(&["set", "--pid", "1"]).is_ok());
        assert!(parse(&["set", "--unit", "x", "--slice", "user.slice"]).is_ok());
        let err = parse(&["set", "--cgroup", "a", "--pid", "1"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
        assert!(parse(&["set", "--slice", "user.slice", "--cgroup", "a"]).is_err());
        assert!(parse(&["set", "--pid", "abc"]).is_err());
        assert!(parse(&["unset", "--container", "8d2c46a4"]).is_ok());
        assert!(parse(&["inspect", "--container", "8d2c46a4", "--json"]).is_ok());
        assert!(parse(&["set", "--container", "8d2c", "--pid", "1"]).is_err());
        assert!(parse(&["set", "--container", "8d2c", "--slice", "x.slice"]).is_err());
        assert!(parse(&["stats", "--container", "8d2c", "--json"]).is_ok());
    }

    #[test]
    fn set_parses_values() {
        let cli = parse(&[
            "set", "--cgroup", "app", "--idle", "180", "--intvl", "60", "--cnt", "20",
        ])
        .unwrap();
        let Command::Set(args) = cli.command else {
            panic!("not set")
        };
        assert_eq!(
            (
                args.values.idle,
                args.values.intvl,
                args.values.cnt,
                args.values.off
            ),
            (Some(180), Some(60), Some(20), false)
        );
    }

    #[test]
    fn set_rejects_bad_values_with_the_range() {
        let err = parse(&["set", "--cgroup", "app", "--idle", "0"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("between 1 and 32767"), "{err}");
        let err = parse(&["set", "--cgroup", "app", "--cnt", "x"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("between 1 and 127"), "{err}");
    }

    #[test]
    fn off_conflicts_with_values() {
        let err = parse(&["set", "--cgroup", "app", "--off", "--idle", "5"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
        assert!(parse(&["set", "--cgroup", "app", "--off"]).is_ok());
        for (extra, name) in [
            (&["--enforce"][..], "--enforce"),
            (&["--user-timeout", "5"], "--user-timeout"),
        ] {
            for command in ["set", "exec"] {
                let mut args = vec![command];
                if command == "set" {
                    args.extend(["--cgroup", "app"]);
                }
                args.push("--off");
                args.extend(extra);
                if command == "exec" {
                    args.extend(["--", "true"]);
                }
                let err = parse(&args).unwrap_err();
                assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
                let line = clap_error_line(&err.render().to_string());
                assert!(line.contains("--off") && line.contains(name), "{line}");
            }
        }
    }

    #[test]
    fn user_timeout_and_enforce_flags() {
        let cli = parse(&[
            "exec",
            "--user-timeout",
            "2147483647",
            "--enforce",
            "--",
            "true",
        ])
        .unwrap();
        let Command::Exec(args) = cli.command else {
            panic!("not exec")
        };
        let flags = args.values.flags();
        assert_eq!(
            (flags.user_timeout, flags.enforce),
            (Some(2_147_483_647), true)
        );
        for bad in ["0", "-5", "abc", "2147483648", "1.5"] {
            let err = parse(&["set", "--cgroup", "app", "--user-timeout", bad]).unwrap_err();
            let line = clap_error_line(&err.render().to_string());
            assert!(
                line.contains("--user-timeout") && line.contains("between 1 and 2147483647"),
                "{bad}: {line}"
            );
        }
    }

    #[test]
    fn clap_errors_become_one_line() {
        let err = parse(&["set"]).unwrap_err().render().to_string();
        let line = clap_error_line(&err);
        assert!(
            line.starts_with("the following required arguments were not provided: "),
            "{line}"
        );
        assert!(
            line.contains("--cgroup <CG>") && line.contains("--pid <N>"),
            "{line}"
        );
        let err = parse(&["set", "--cgroup", "a", "--idle", "0"])
            .unwrap_err()
            .render()
            .to_string();
        let line = clap_error_line(&err);
        assert!(
            !line.contains('\n') && line.contains("between 1 and 32767"),
            "{line}"
        );
    }

    #[test]
    fn socket_defaults_and_overrides() {
        use clap::CommandFactory as _;
        let command = Cli::command();
        let socket = command
            .get_arguments()
            .find(|a| a.get_id() == "socket")
            .expect("a --socket option");
        assert_eq!(socket.get_default_values(), [DEFAULT_SOCKET]);
        assert_eq!(
            socket.get_env().and_then(|e| e.to_str()),
            Some("KAD_SOCKET")
        );
        // This process's environment decides which of the two applies here.
        let expected = std::env::var_os("KAD_SOCKET")
            .map_or_else(|| PathBuf::from(DEFAULT_SOCKET), PathBuf::from);
        assert_eq!(parse(&["list"]).unwrap().socket, expected);
        let cli = parse(&["list", "--socket", "/tmp/x.sock"]).unwrap();
        assert_eq!(cli.socket, PathBuf::from("/tmp/x.sock"));
    }
}
