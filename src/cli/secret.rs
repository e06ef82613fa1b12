//! Passphrases of encrypted repositories, and `strata key`.
//!
//! A passphrase comes from `--password-file FILE` (or
//! `STRATA_PASSWORD_FILE`; one trailing newline is ignored),
//! `STRATA_PASSWORD`, or a prompt on the terminal. A command whose standard
//! input is not a terminal never waits for one.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;

use strata::store::keys;

use super::{open, Cli};

#[derive(Args)]
pub struct KeyArgs {
    #[command(subcommand)]
    command: KeyCommand,
}

#[derive(Subcommand)]
enum KeyCommand {
    /// List the repository's keys (one per passphrase).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Add a passphrase that opens the repository.
    Add(NewPassphraseArgs),
    /// Remove a key: its passphrase opens nothing from then on (never the last key).
    Remove { key_id: String },
    /// Change the passphrase that opened the repository.
    Passwd(NewPassphraseArgs),
}

#[derive(Args)]
struct NewPassphraseArgs {
    /// Read the new passphrase from this file (one trailing newline is ignored).
    #[arg(long)]
    new_password_file: Option<PathBuf>,
}

/// The passphrase for an existing repository, as the library asks for it.
pub fn passphrase(cli: &Cli) -> strata::Result<String> {
    if let Some(file) = &cli.password_file {
        return read_file(file);
    }
    if let Ok(p) = std::env::var("STRATA_PASSWORD") {
        return Ok(p);
    }
    if std::io::stdin().is_terminal() {
        return rpassword::prompt_password("passphrase: ")
            .map_err(|e| strata::Error::io("read the passphrase from the terminal", e));
    }
    Err(strata::Error::NeedPassphrase(
        "no passphrase given: use --password-file FILE, STRATA_PASSWORD_FILE or \
         STRATA_PASSWORD (standard input is not a terminal, so strata does not ask)"
            .into(),
    ))
}

pub fn read_file(file: &Path) -> strata::Result<String> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        strata::Error::io(format!("read the passphrase from {}", file.display()), e)
    })?;
    let text = text.strip_suffix('\n').unwrap_or(&text);
    Ok(text.strip_suffix('\r').unwrap_or(text).to_string())
}

/// A passphrase being set (init, key add, key passwd): from `file`, the
/// usual sources, or asked twice on the terminal.
pub fn new_passphrase(cli: &Cli, file: Option<&Path>) -> Result<String> {
    if let Some(file) = file {
        return Ok(read_file(file)?);
    }
    if cli.password_file.is_some() || std::env::var_os("STRATA_PASSWORD").is_some() {
        return Ok(passphrase(cli)?);
    }
    if !std::io::stdin().is_terminal() {
        bail!(
            "no passphrase given: use --password-file FILE, STRATA_PASSWORD_FILE or \
             STRATA_PASSWORD (standard input is not a terminal, so strata does not ask)"
        );
    }
    let first = rpassword::prompt_password("new passphrase: ")?;
    let again = rpassword::prompt_password("the same again: ")?;
    if first != again {
        bail!("the passphrases differ; nothing was changed");
    }
    Ok(first)
}

/// The new passphrase of `key add`/`key passwd`: `--new-password-file`,
/// else asked twice on the terminal (the usual sources give the current one).
fn replacement(a: &NewPassphraseArgs) -> Result<String> {
    if let Some(file) = &a.new_password_file {
        return Ok(read_file(file)?);
    }
    if !std::io::stdin().is_terminal() {
        bail!("give the new passphrase with --new-password-file FILE");
    }
    let first = rpassword::prompt_password("new passphrase: ")?;
    let again = rpassword::prompt_password("the same again: ")?;
    if first != again {
        bail!("the passphrases differ; nothing was changed");
    }
    Ok(first)
}

pub fn key(cli: &Cli, a: &KeyArgs) -> Result<ExitCode> {
    let repo = open(cli)?;
    let root = repo.backend();
    let current = repo
        .key_id()
        .context("the repository is not encrypted: it has no keys")?
        .to_string();
    match &a.command {
        KeyCommand::List { json } => list(root, &current, *json)?,
        KeyCommand::Add(n) => {
            let (master, _) = keys::unlock(root, &passphrase(cli)?)?;
            let added = keys::create(root, &master, &replacement(n)?)?;
            println!("added key {}", added.id);
        }
        KeyCommand::Remove { key_id } => {
            keys::remove(root, key_id)?;
            println!("removed key {key_id}");
        }
        KeyCommand::Passwd(n) => {
            let (master, _) = keys::unlock(root, &passphrase(cli)?)?;
            let added = keys::create(root, &master, &replacement(n)?)?;
            keys::remove(root, &current)?;
            println!(
                "changed the passphrase: key {current} replaced by {}",
                added.id
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn list(root: &dyn strata::store::backend::Backend, current: &str, as_json: bool) -> Result<()> {
    let files = keys::list(root)?;
    if as_json {
        let out: Vec<_> = files
            .iter()
            .map(|k| {
                json!({
                    "id": k.id,
                    "created": k.created,
                    "current": k.id == current,
                    "kdf": k.kdf.algorithm,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    for k in &files {
        let mark = if k.id == current { "*" } else { " " };
        println!("{mark} {}  {}", k.id, k.created);
    }
    Ok(())
}
