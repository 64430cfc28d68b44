fn main() -> std::process::ExitCode {
    keepalive_daemon::cli::main()
}
