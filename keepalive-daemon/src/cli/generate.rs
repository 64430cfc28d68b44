//! `kad completions SHELL` and the hidden `kad manpages DIR`: shell completions and man pages
//! made from the clap command itself, so they always match the binary.
use std::{
    io::{self, Write as _},
    path::PathBuf,
};

use anyhow::Context as _;
use clap::Args;
use clap_complete::Shell;

#[derive(Debug, Args)]
pub(super) struct CompletionsArgs {
    /// The shell to print a completion script for.
    #[arg(value_enum)]
    shell: Shell,
}

#[derive(Debug, Args)]
pub(super) struct ManpagesArgs {
    /// Where to write kad.1 and a kad-COMMAND.1 per command.
    #[arg(value_name = "DIR")]
    dir: PathBuf,
}

/// `kad completions SHELL`: the script on stdout.
pub(super) fn completions(args: &CompletionsArgs) -> anyhow::Result<()> {
    let mut command = super::command();
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut command, "kad", &mut script);
    // A closed pipe is an error line, not clap_complete's panic.
    io::stdout()
        .write_all(&script)
        .context("cannot write the completion script")
}

/// `kad manpages DIR`.
pub(super) fn manpages(args: &ManpagesArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    for (name, page) in pages()? {
        let path = args.dir.join(format!("{name}.1"));
        std::fs::write(&path, page).with_context(|| format!("cannot write {}", path.display()))?;
        println!("{}", path.display());
    }
    Ok(())
}

/// Each page's name (`kad`, `kad-set`, ...) and its roff text: one for kad, one per command
/// that is not hidden.
fn pages() -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let command = super::command();
    let version = command.get_version().unwrap_or_default().to_string();
    let mut pages = vec![("kad".to_string(), render(command.clone())?)];
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("kad-{}", sub.get_name());
        let page = sub
            .clone()
            .name(name.clone())
            .bin_name(format!("kad {}", sub.get_name()))
            .version(version.clone());
        pages.push((name, render(page)?));
    }
    Ok(pages)
}

fn render(command: clap::Command) -> anyhow::Result<Vec<u8>> {
    let mut page = Vec::new();
    clap_mangen::Man::new(command)
        .render(&mut page)
        .context("cannot render a man page")?;
    Ok(page)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_for_kad_and_each_visible_command() {
        let pages = pages().unwrap();
        let names: Vec<&str> = pages.iter().map(|(n, _)| n.as_str()).collect();
        for name in [
            "kad",
            "kad-daemon",
            "kad-set",
            "kad-uninstall",
            "kad-completions",
        ] {
            assert!(names.contains(&name), "{name} in {names:?}");
        }
        assert!(!names.contains(&"kad-manpages"), "hidden: {names:?}");
        let (_, set) = pages.iter().find(|(n, _)| n == "kad-set").unwrap();
        let set = String::from_utf8_lossy(set);
        assert!(set.contains(".TH kad-set 1"), "{set}");
        assert!(set.contains("\\-\\-idle"), "{set}");
    }

    #[test]
    fn completions_know_the_commands() {
        let mut script = Vec::new();
        clap_complete::generate(
            Shell::Bash,
            &mut super::super::command(),
            "kad",
            &mut script,
        );
        let script = String::from_utf8(script).unwrap();
        assert!(script.contains("install-host") && script.contains("--idle"));
    }
}
