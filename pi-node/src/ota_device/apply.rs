//! The apply step: the configured command, run on a verified image.
//!
//! The command is an argument list (no shell), run with the image path appended and
//! `QUVA_OTA_GROUP`, `QUVA_OTA_VERSION` and `QUVA_OTA_NAME` in its environment. Exit status 0
//! means applied; anything else is a failure whose detail (the status and the last line the
//! command wrote on stderr) goes into the `failed` status report. It should be idempotent: a
//! device killed after the command succeeded but before it recorded the version runs it again on
//! the same image after the restart (`packaging/bin/quva-node-apply-binary` is).
//!
//! In the daemon the command runs for at most `[ota] apply_timeout_secs` ([`run_limited`]):
//! then it is killed (SIGKILL) and the release fails with a detail that says so. Only the
//! command itself is killed: processes it left in the background are its own business.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use quva_client::ids::GroupId;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Longest detail kept from the command's stderr, in bytes.
const MAX_DETAIL: usize = 300;

/// How long the command's output is still read once it has exited or been killed (a process
/// it started in the background may hold its pipes open).
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

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

/// Runs `cmd` (from [`ApplyCommand::command`]) to completion, or kills it once `timeout` has
/// passed.
///
/// # Errors
/// The failure's detail: the command could not start, or it ran longer than `timeout` and was
/// killed.
pub async fn run_limited(cmd: Command, timeout: Duration) -> Result<Output, String> {
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run the apply command: {e}"))?;
    let stdout = tokio::spawn(read_all(child.stdout.take()));
    let stderr = tokio::spawn(read_all(child.stderr.take()));
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => return Err(format!("cannot wait for the apply command: {e}")),
        Err(_) => {
            let killed = child.start_kill();
            let _ = child.wait().await;
            stdout.abort();
            stderr.abort();
            return Err(match killed {
                Ok(()) => format!(
                    "apply command timed out after {} s and was killed",
                    timeout.as_secs_f64()
                ),
                Err(e) => format!(
                    "apply command timed out after {} s and could not be killed: {e}",
                    timeout.as_secs_f64()
                ),
            });
        }
    };
    let collect = |task: tokio::task::JoinHandle<Vec<u8>>| async move {
        tokio::time::timeout(OUTPUT_GRACE, task)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default()
    };
    Ok(Output {
        status,
        stdout: collect(stdout).await,
        stderr: collect(stderr).await,
    })
}

/// Everything a pipe delivers until it closes (nothing without a pipe).
async fn read_all(pipe: Option<impl AsyncRead + Unpin>) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(mut p) = pipe {
        let _ = p.read_to_end(&mut out).await;
    }
    out
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

    #[tokio::test]
    async fn a_command_over_its_time_is_killed_and_fails() {
        let g = GroupId::new("fw/a").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let done = dir.path().join("done");
        let pid_file = dir.path().join("pid");
        // Without the limit this would run 30 s and then leave a file behind.
        let slow = sh(&format!(
            "echo $$ > {}; sleep 30; touch {}",
            pid_file.display(),
            done.display()
        ));
        let err = run_limited(
            slow.command(Path::new("/x"), &g, 1, "n"),
            Duration::from_millis(300),
        )
        .await
        .unwrap_err();
        assert!(
            err.contains("timed out after 0.3 s and was killed"),
            "{err}"
        );
        // The command itself is gone (killed and reaped), not merely abandoned.
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        assert!(
            !Path::new("/proc").join(pid.trim()).exists(),
            "pid {pid} still runs"
        );
        assert!(!done.exists());
        // Within its time the command's output and status come back as before.
        let out = run_limited(
            sh("echo ok; echo 'disk full' >&2; exit 3").command(Path::new("/x"), &g, 1, "n"),
            Duration::from_secs(20),
        )
        .await
        .unwrap();
        assert_eq!(out.stdout, b"ok\n");
        assert!(outcome(&out).unwrap_err().ends_with("disk full"));
    }
}
