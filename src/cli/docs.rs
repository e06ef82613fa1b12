//! Documentation generated from the clap definitions: shell completions
//! and man pages, so that neither can fall behind the real options.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use clap_complete::Shell;

#[derive(Args)]
pub struct CompletionsArgs {
    /// bash, zsh or fish (also elvish, powershell).
    shell: Shell,
}

#[derive(Args)]
pub struct ManArgs {
    /// Directory to write strata.1 and strata-COMMAND.1 into (created if missing).
    dir: PathBuf,
}

pub fn completions(a: &CompletionsArgs) -> Result<ExitCode> {
    let mut cmd = super::command();
    clap_complete::generate(a.shell, &mut cmd, "strata", &mut std::io::stdout());
    Ok(ExitCode::SUCCESS)
}

pub fn man(a: &ManArgs) -> Result<ExitCode> {
    std::fs::create_dir_all(&a.dir).with_context(|| format!("create {}", a.dir.display()))?;
    // The plain version: man renders the long one (the format list) as one
    // run-on paragraph.
    use clap::CommandFactory;
    clap_mangen::generate_to(super::Cli::command(), &a.dir)
        .with_context(|| format!("write man pages into {}", a.dir.display()))?;
    println!("wrote man pages into {}", a.dir.display());
    Ok(ExitCode::SUCCESS)
}
