//! The `kad` command line. This file holds the clap types of the command line and [`main`],
//! which parses it and hands each command to its own file: `policies.rs` (set, unset, reload,
//! list, status, stats), `daemon.rs` (`kad daemon`), `uninstall.rs`, [`exec`], [`probe`],
//! [`inspect`], [`audit`], `oci_hook.rs`, `install_host.rs` (the DaemonSet's init step),
//! `generate.rs` (completions and man pages from [`command`]); `args.rs` holds the arguments several commands share
//! and `output.rs` how results print. Each command runs in the CLI's own process. This folder
//! may import any layer below it: `daemon`, `containers`, `kernel`, `api`, `host`, `model`.
mod args;
pub mod audit;
mod daemon;
pub mod exec;
mod generate;
pub mod inspect;
mod install_host;
mod oci_hook;
mod output;
mod policies;
pub mod probe;
mod uninstall;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

use args::{JsonFlag, TargetArgs};

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
    Daemon(daemon::DaemonArgs),
    /// Set the keepalive policy of a cgroup and everything below it.
    Set(policies::SetArgs),
    /// Remove a cgroup's policy (set with `kad set`).
    Unset(TargetArgs),
    /// Re-read the daemon's config file (as SIGHUP does).
    Reload,
    /// Detach everything kad attached and remove its pins (stop the daemon first).
    Uninstall(uninstall::UninstallArgs),
    /// List the policies.
    List(JsonFlag),
    /// Show the daemon's state: program, kernel, cgroup2 root, policies.
    Status(JsonFlag),
    /// Show what the kernel program counted per policy cgroup.
    Stats(policies::StatsArgs),
    /// Run a command in a transient cgroup with a keepalive policy (libkeepalive's variables
    /// KEEPIDLE, KEEPINTVL, KEEPCNT, TCP_USER_TIMEOUT, KEEPALIVE=off fill in what the flags do
    /// not give).
    Exec(exec::ExecArgs),
    /// Open a TCP connection from here and print the keepalive settings it got.
    Probe(JsonFlag),
    /// List the established TCP connections of processes with their real keepalive state,
    /// marking those that differ from the policy in force.
    Inspect(inspect::InspectArgs),
    /// Per cgroup with established TCP connections: how many have keepalive off, how many
    /// differ from the policy in force, and which policy applies (read from the kernel).
    Audit(audit::AuditArgs),
    /// An OCI runtime hook (hooks.d): reads the container's state on stdin and puts its
    /// kad.dev/keepalive annotation in force (createRuntime) or removes it (poststop).
    OciHook(oci_hook::OciHookArgs),
    /// Copy this kad onto a host directory and write the OCI hooks.d file that runs it there
    /// (the init step of the Kubernetes DaemonSet).
    InstallHost(install_host::InstallHostArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(generate::CompletionsArgs),
    /// Write the man pages (kad.1, kad-COMMAND.1) into a directory (for packaging).
    #[command(hide = true)]
    Manpages(generate::ManpagesArgs),
}

/// The `kad` command as clap sees it: what the man pages and shell completions are made from.
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
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
        // Only `kad exec` exits with a status of its own: its command's.
        Command::Exec(args) => return exec::command(&socket, args),
        Command::OciHook(args) => oci_hook::command(&socket, &args)?,
        Command::Probe(flag) => probe::command(&flag)?,
        Command::Inspect(args) => inspect::command(&socket, &args)?,
        Command::Audit(args) => audit::command(&socket, &args)?,
        Command::Stats(args) => policies::stats(&socket, &args)?,
        Command::Daemon(args) => daemon::command(socket, args)?,
        Command::Set(args) => policies::set(&socket, &args)?,
        Command::Unset(args) => policies::unset(&socket, &args)?,
        Command::Reload => policies::reload(&socket)?,
        Command::Uninstall(args) => uninstall::command(&args)?,
        Command::List(flag) => policies::list(&socket, &flag)?,
        Command::Status(flag) => policies::status(&socket, &flag)?,
        Command::InstallHost(args) => install_host::command(&args)?,
        Command::Completions(args) => generate::completions(&args)?,
        Command::Manpages(args) => generate::manpages(&args)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `kad ARGS...` parsed as `main` parses it, for the tests of every command's arguments.
#[cfg(test)]
fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(std::iter::once("kad").chain(args.iter().copied()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
