//! The apply step: the configured command, run on a verified image.
//!
//! The command is an argument list (no shell), run with the image path appended and
//! `QUVA_OTA_GROUP`, `QUVA_OTA_VERSION` and `QUVA_OTA_NAME` in its environment. Exit status 0
//! means applied; anything else is a failure whose detail (the status and the last line the
//! command wrote on stderr) goes into the `failed` status report. It should be idempotent: a
//! device killed after the command succeeded but before it recorded the version runs it again on
//! the same image after the restart (`packaging/bin/quva-node-apply-binary` is).

use std::path::Path;
use std::process::{Command, Output, Stdio};

use quva_client::ids::GroupId;

/// Longest detail kept from the command's stderr, in bytes.
const MAX_DETAIL: usize = 300;

/// The configured apply command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApplyCommand {
    program: String,
    args: Vec<String>,
}

impl ApplyCommand {
    /// The command `argv` (program first). `None` if empty.
    pub fn new(argv: Vec<String>) -> Option<Self> {
        let mut argv = argv.into_iter();
        Some(ApplyCommand {
            program: argv.next()?,
            args: argv.collect(),
        })
    }

    /// The process to start for `image`: stdin closed, stdout and stderr captured.
    pub fn command(&self, image: &Path, group: &GroupId, version: u64, name: &str) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .arg(image)
            .env("QUVA_OTA_GROUP", group.as_str())
            .env("QUVA_OTA_VERSION", version.to_string())
            .env("QUVA_OTA_NAME", printable(name))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Runs the command to completion (blocking).
    ///
    /// # Errors
    /// The failure's detail: the command could not start, or its exit status and last stderr
    /// line.
    pub fn run(
        &self,
        image: &Path,
        group: &GroupId,
        version: u64,
        name: &str,
    ) -> Result<(), String> {
        let output = self
            .command(image, group, version, name)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.program))?;
        outcome(&output)
    }
}

/// The result of a finished apply command.
///
/// # Errors
/// For a non-zero status: the status and the command's last stderr line.
pub fn outcome(output: &Output) -> Result<(), String> {
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
    let mut detail = format!("apply command failed ({})", output.status);
    if let Some(line) = last {
        detail.push_str(": ");
        detail.push_str(&printable(line));
    }
    Err(truncate(detail, MAX_DETAIL))
}

/// `s` with control characters replaced, for environment values and log lines.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> ApplyCommand {
        ApplyCommand::new(vec![
            "/bin/sh".into(),
            "-c".into(),
            script.into(),
            "sh".into(),
        ])
        .unwrap()
    }

    #[test]
    fn image_path_and_environment_reach_the_command() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let cmd = sh(&format!(
            "echo \"$1 $QUVA_OTA_GROUP $QUVA_OTA_VERSION $QUVA_OTA_NAME\" > {}",
            out.display()
        ));
        let g = GroupId::new("fw/a").unwrap();
        cmd.run(Path::new("/x/img"), &g, 7, "fw\n7.bin").unwrap();
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "/x/img fw/a 7 fw?7.bin\n"
        );
    }

    #[test]
    fn failure_names_status_and_last_stderr_line() {
        let g = GroupId::new("fw/a").unwrap();
        let err = sh("echo first >&2; echo 'disk full' >&2; exit 3")
            .run(Path::new("/x"), &g, 1, "n")
            .unwrap_err();
        assert!(err.contains("exit status: 3"), "{err}");
        assert!(err.ends_with("disk full"), "{err}");
        let err = ApplyCommand::new(vec!["/nonexistent/apply".into()])
            .unwrap()
            .run(Path::new("/x"), &g, 1, "n")
            .unwrap_err();
        // Whether a missing program fails the spawn or the child (exit status 127) depends on
        // how the standard library starts processes here: both are reported as a failure.
        assert!(
            err.contains("cannot run /nonexistent/apply") || err.contains("exit status: 127"),
            "{err}"
        );
        assert!(ApplyCommand::new(Vec::new()).is_none());
    }
}
