//! libvirt through `virsh`, one command per call.
//!
//! Why virsh and not the `virt` crate: the operations strata needs
//! (backup-begin with a checkpoint, checkpoint redefine/delete, job abort,
//! fsfreeze) have no safe wrappers in `virt`, so using it means unsafe FFI
//! over `virt::sys` plus libvirt-dev and bindgen at build time; virsh
//! makes exactly the same API calls, prints libvirt's own error message
//! (which our errors carry), and needs no unsafe code. The cost is one
//! process per call, a few milliseconds against a backup's seconds.

use std::path::Path;
use std::process::Command;

use crate::error::{Error, Result};

/// A connection URI and the domain all calls are about.
pub struct Virsh {
    pub uri: String,
    pub domain: String,
}

impl Virsh {
    /// Run `virsh -c URI ARGS...`; its stdout, or an error carrying
    /// libvirt's message.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("virsh")
            // strata parses some of virsh's output (domstate): untranslated.
            .env("LC_ALL", "C")
            .arg("-q")
            .arg("-c")
            .arg(&self.uri)
            .args(args)
            .output()
            .map_err(|e| Error::io("running virsh (is libvirt-clients installed?)", e))?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        let msg = String::from_utf8_lossy(&out.stderr);
        let msg = msg
            .lines()
            .map(|l| l.trim().trim_start_matches("error: "))
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        Err(Error::invalid(format!(
            "libvirt ({}): virsh {}: {msg}",
            self.uri,
            args.first().copied().unwrap_or("")
        )))
    }

    /// Run a command about the domain: `virsh CMD DOMAIN ARGS...`.
    pub fn dom(&self, cmd: &str, args: &[&str]) -> Result<String> {
        let mut all = vec![cmd, self.domain.as_str()];
        all.extend_from_slice(args);
        self.run(&all)
    }

    pub fn state(&self) -> Result<String> {
        Ok(self.dom("domstate", &[])?.trim().to_string())
    }

    /// The live XML (or the persistent one with `inactive`).
    pub fn xml(&self, inactive: bool) -> Result<String> {
        if inactive {
            self.dom("dumpxml", &["--inactive"])
        } else {
            self.dom("dumpxml", &[])
        }
    }

    pub fn checkpoints(&self) -> Result<Vec<String>> {
        Ok(self
            .dom("checkpoint-list", &["--name"])?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect())
    }

    pub fn checkpoint_xml(&self, name: &str) -> Result<String> {
        self.dom("checkpoint-dumpxml", &[name])
    }

    pub fn checkpoint_delete(&self, name: &str) -> Result<()> {
        self.dom("checkpoint-delete", &[name]).map(drop)
    }

    /// Redefine checkpoint metadata from XML saved earlier
    /// (VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE).
    pub fn checkpoint_redefine(&self, xml_file: &Path) -> Result<()> {
        let file = path_str(xml_file)?;
        self.dom("checkpoint-create", &[file, "--redefine"])
            .map(drop)
    }

    /// virDomainBackupBegin.
    pub fn backup_begin(&self, backup_xml: &Path, checkpoint_xml: &Path) -> Result<()> {
        let (b, c) = (path_str(backup_xml)?, path_str(checkpoint_xml)?);
        self.dom("backup-begin", &[b, c]).map(drop)
    }

    /// The running backup job's XML, if there is one.
    pub fn backup_xml(&self) -> Option<String> {
        self.dom("backup-dumpxml", &[]).ok()
    }

    /// virDomainAbortJob: for a pull backup, this is how it ends.
    pub fn abort_job(&self) -> Result<()> {
        self.dom("domjobabort", &[]).map(drop)
    }
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| Error::invalid(format!("path {} is not UTF-8", p.display())))
}
