//! The command-line client end to end: the `sandboxd` binary run as a client against a real
//! server, containerd and registry, its output and exit codes checked as a user would see them.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::TestEnv;
use serde_json::Value;
use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_sandboxd");
/// How long one client command may take before the test fails (image pulls included).
const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a terminal screen may take to show what the test waits for.
const SCREEN_TIMEOUT: Duration = Duration::from_secs(20);

/// What one client invocation did.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    raw_stdout: Vec<u8>,
}

impl Run {
    /// Panics (showing stderr) unless the command exited 0; returns stdout.
    fn ok(self) -> String {
        assert_eq!(self.code, Some(0), "command failed: {self:?}");
        self.stdout
    }
}

/// Runs `sandboxd --server SERVER ARGS...`, feeding `stdin` (else /dev/null).
fn run_with(server: &str, args: &[&str], stdin: Option<&[u8]>, envs: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(BIN);
    if !server.is_empty() {
        cmd.arg("--server").arg(server);
    }
    cmd.args(args)
        .env_remove("SANDBOXD_SERVER")
        .envs(envs.iter().copied())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn sandboxd client");
    if let Some(data) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        });
    }
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(CLI_TIMEOUT) {
        Ok(out) => out.expect("wait for sandboxd client"),
        Err(_) => {
            common::host::send_signal(pid, nix::sys::signal::Signal::SIGKILL);
            panic!("sandboxd {args:?} did not finish within {CLI_TIMEOUT:?}");
        }
    };
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        raw_stdout: out.stdout,
    }
}

fn cli(env: &TestEnv, args: &[&str]) -> Run {
    run_with(&env.endpoint(), args, None, &[])
}

fn cli_stdin(env: &TestEnv, args: &[&str], stdin: &[u8]) -> Run {
    run_with(&env.endpoint(), args, Some(stdin), &[])
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The rows of a table for which the first column is `id`.
fn rows_of<'a>(table: &'a str, id: &str) -> Vec<&'a str> {
    table
        .lines()
        .skip(1)
        .filter(|l| l.split_whitespace().next() == Some(id))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_sandbox_lifecycle_round_trip() {
    let env = TestEnv::new().await;
    let image = env.image_ref();

    let created = cli(
        &env,
        &[
            "sandbox",
            "create",
            &image,
            "--id",
            "cli-a",
            "--label",
            "team=docs",
            "-l",
            "tier=1",
            "--env",
            "GREETING=hi",
            "--pids",
            "64",
            "--memory",
            "64Mi",
        ],
    )
    .ok();
    assert_eq!(created, "cli-a\n");

    // A generated id, a command after `--`, not started.
    let generated = cli(
        &env,
        &[
            "sandbox",
            "create",
            &image,
            "--no-start",
            "--",
            "sleep",
            "1000",
        ],
    )
    .ok();
    let generated = generated.trim().to_string();
    assert!(
        !generated.is_empty()
            && generated
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.-".contains(c)),
        "generated id {generated:?}"
    );

    let table = cli(&env, &["sandbox", "ls"]).ok();
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["SANDBOX", "ID", "IMAGE", "STATE", "PID", "CREATED", "LABELS"]
    );
    let row = rows_of(&table, "cli-a");
    assert_eq!(row.len(), 1, "{table}");
    assert!(
        row[0].contains(&image) && row[0].contains("RUNNING"),
        "{table}"
    );
    assert!(row[0].ends_with("team=docs,tier=1"), "{table}");
    let row = rows_of(&table, &generated);
    assert!(row.len() == 1 && row[0].contains("CREATED"), "{table}");

    let selected = cli(&env, &["sandbox", "ls", "--selector", "team=docs"]).ok();
    assert_eq!(selected.lines().count(), 2, "{selected}");
    assert_eq!(rows_of(&selected, "cli-a").len(), 1, "{selected}");

    // -o json, one sandbox per page: every page is followed.
    let listed = json(&cli(&env, &["sandbox", "ls", "-o", "json", "--page-size", "1"]).ok());
    let mut ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sandbox_id"].as_str().unwrap())
        .collect();
    ids.sort();
    let mut expected = vec!["cli-a", generated.as_str()];
    expected.sort();
    assert_eq!(ids, expected);

    let got = json(&cli(&env, &["sandbox", "get", "cli-a", "-o", "json"]).ok());
    assert_eq!(got["sandbox_id"], "cli-a");
    assert_eq!(got["image"], image.as_str());
    assert_eq!(got["state"], "RUNNING");
    assert!(got["pid"].as_u64().unwrap() > 0, "{got}");
    assert_eq!(got["labels"]["team"], "docs");
    assert_eq!(got["labels"]["tier"], "1");
    assert_eq!(got["resources"]["pids_limit"], 64);
    assert_eq!(got["resources"]["memory_bytes"], 64 << 20);
    assert_eq!(got["network"]["mode"], "NONE");
    assert!(got["created_at"].as_str().unwrap().ends_with('Z'), "{got}");
    assert_eq!(got["exit_status"], Value::Null);
    let text = cli(&env, &["sandbox", "get", "cli-a"]).ok();
    assert!(
        text.lines()
            .any(|l| l.starts_with("State:") && l.ends_with("RUNNING")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("Labels:") && l.ends_with("team=docs,tier=1")),
        "{text}"
    );

    // The environment given at creation reaches the sandbox.
    let hi = cli(&env, &["exec", "cli-a", "--", "sh", "-c", "echo $GREETING"]).ok();
    assert_eq!(hi, "hi\n");

    assert_eq!(
        cli(&env, &["sandbox", "stop", "cli-a", "--timeout", "5s", "-f"]).ok(),
        "cli-a\n"
    );
    let stopped = json(&cli(&env, &["sandbox", "get", "cli-a", "-o", "json"]).ok());
    assert_eq!(stopped["state"], "STOPPED");
    assert!(stopped["exit_status"].is_i64(), "{stopped}");
    assert_eq!(stopped["pid"], 0);

    let started = json(&cli(&env, &["sandbox", "start", "cli-a", "-o", "json"]).ok());
    assert_eq!(started["state"], "RUNNING");
    assert_eq!(
        cli(&env, &["sandbox", "start", &generated]).ok().trim(),
        generated
    );

    let refused = cli(&env, &["sandbox", "rm", "cli-a"]);
    assert_eq!(refused.code, Some(1), "{refused:?}");
    assert!(
        refused
            .stderr
            .starts_with("sandboxd: FAILED_PRECONDITION: "),
        "{refused:?}"
    );
    assert_eq!(cli(&env, &["sandbox", "rm", "-f", "cli-a"]).ok(), "cli-a\n");
    let missing = cli(&env, &["sandbox", "get", "cli-a"]);
    assert_eq!(missing.code, Some(1), "{missing:?}");
    assert!(
        missing.stderr.starts_with("sandboxd: NOT_FOUND: "),
        "{missing:?}"
    );
    assert!(missing.stdout.is_empty(), "{missing:?}");

    // SANDBOXD_SERVER picks the server when --server is absent.
    let via_env = run_with(
        "",
        &["sandbox", "rm", "--force", &generated, "-o", "json"],
        None,
        &[("SANDBOXD_SERVER", &env.endpoint())],
    )
    .ok();
    assert_eq!(json(&via_env)["sandbox_id"], generated.as_str());
    assert_eq!(cli(&env, &["sandbox", "ls"]).ok().lines().count(), 1);
    assert_eq!(
        json(&cli(&env, &["sandbox", "ls", "-o", "json"]).ok()),
        Value::Array(vec![])
    );

    // Usage errors exit 2, before anything is sent.
    let usage = cli(&env, &["sandbox", "create"]);
    assert_eq!(usage.code, Some(2), "{usage:?}");
    let usage = cli(&env, &["sandbox", "create", &image, "--ttl", "soon"]);
    assert_eq!(usage.code, Some(2), "{usage:?}");
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_reports_an_unreachable_or_malformed_server() {
    let env = TestEnv::new().await;
    // Nothing listens on port 1, nor on a socket that does not exist.
    for server in [
        "http://127.0.0.1:1",
        "127.0.0.1:1",
        "unix:/nonexistent/sandboxd.sock",
    ] {
        let run = run_with(server, &["sandbox", "ls"], None, &[]);
        assert_eq!(run.code, Some(1), "{server}: {run:?}");
        assert!(
            run.stderr.starts_with("sandboxd: UNAVAILABLE: "),
            "{server}: {run:?}"
        );
        assert_eq!(run.stderr.lines().count(), 1, "{server}: {run:?}");
        assert!(run.stdout.is_empty(), "{server}: {run:?}");
    }
    // https:// is TLS now (tests/auth.rs); another scheme is still a usage error.
    let bad = run_with("ftp://127.0.0.1:7878", &["sandbox", "ls"], None, &[]);
    assert_eq!(bad.code, Some(2), "{bad:?}");
    assert!(bad.stderr.contains("invalid --server"), "{bad:?}");
    // The good server still answers.
    assert_eq!(cli(&env, &["image", "ls"]).ok().lines().count(), 1);
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_exec_passes_output_stdin_and_exit_codes_through() {
    let env = TestEnv::new().await;
    cli(
        &env,
        &["sandbox", "create", &env.image_ref(), "--id", "cli-x"],
    )
    .ok();

    let run = cli(
        &env,
        &[
            "exec",
            "cli-x",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 3",
        ],
    );
    assert_eq!(run.code, Some(3), "{run:?}");
    assert_eq!(run.stdout, "out\n");
    assert_eq!(run.stderr, "err\n");

    let killed = cli(&env, &["exec", "cli-x", "--", "sh", "-c", "kill -9 $$"]);
    assert_eq!(killed.code, Some(128 + 9), "{killed:?}");

    // Without `--`, everything after the sandbox is the command, options included.
    assert_eq!(
        cli(
            &env,
            &["exec", "-e", "X=1", "cli-x", "sh", "-c", "echo a $X"]
        )
        .ok(),
        "a 1\n"
    );
    assert_eq!(
        cli(&env, &["exec", "-w", "/etc", "cli-x", "--", "pwd"]).ok(),
        "/etc\n"
    );

    let upper = cli_stdin(
        &env,
        &["exec", "-i", "cli-x", "--", "tr", "a-z", "A-Z"],
        b"hello\n",
    );
    assert_eq!(upper.ok(), "HELLO\n");

    // A MiB through cat and back: stdin and stdout flow at once without deadlock.
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 + i / 251) as u8).collect();
    let echoed = cli_stdin(&env, &["exec", "-i", "cli-x", "--", "cat"], &data);
    assert_eq!(echoed.code, Some(0), "{:?}", echoed.stderr);
    assert!(echoed.raw_stdout == data, "cat returned other bytes");

    // Without -i the command reads EOF at once.
    assert_eq!(
        cli_stdin(&env, &["exec", "cli-x", "--", "wc", "-c"], b"ignored")
            .ok()
            .trim(),
        "0"
    );

    let timed_out = cli(
        &env,
        &["exec", "--timeout", "1s", "cli-x", "--", "sleep", "30"],
    );
    assert_eq!(timed_out.code, Some(128 + 9), "{timed_out:?}");
    assert!(timed_out.stderr.contains("--timeout"), "{timed_out:?}");

    // Ctrl-C on the client interrupts the remote command, whose status comes back.
    let mut child = Command::new(BIN)
        .args(["--server", &env.endpoint(), "exec", "cli-x", "--"])
        .args(["sh", "-c", "echo ready; exec sleep 100"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut ready,
    )
    .unwrap();
    assert_eq!(ready, "ready\n");
    common::host::send_signal(child.id(), nix::sys::signal::Signal::SIGINT);
    let deadline = Instant::now() + CLI_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the interrupted exec never ended"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(128 + 2));

    let missing = cli(&env, &["exec", "nope", "--", "true"]);
    assert_eq!(missing.code, Some(1), "{missing:?}");
    assert!(
        missing.stderr.starts_with("sandboxd: NOT_FOUND: "),
        "{missing:?}"
    );

    cli(&env, &["sandbox", "rm", "-f", "cli-x"]).ok();
    env.leak_check().await;
}

/// A private tmux server (its own socket), killed on drop.
struct Tmux {
    dir: tempfile::TempDir,
}

impl Tmux {
    fn new() -> Tmux {
        assert!(
            Command::new("tmux")
                .arg("-V")
                .output()
                .is_ok_and(|o| o.status.success()),
            "tmux is missing: run scripts/install-deps.sh"
        );
        Tmux {
            dir: tempfile::tempdir().expect("tmux temp dir"),
        }
    }

    fn cmd(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-S")
            .arg(self.dir.path().join("socket"))
            .args(["-f", "/dev/null"])
            .args(args)
            .output()
            .expect("run tmux");
        assert!(out.status.success(), "tmux {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The pane's text, scrollback included.
    fn screen(&self) -> String {
        self.cmd(&["capture-pane", "-p", "-J", "-S", "-200", "-t", "cli"])
    }

    /// Waits until `pred` holds for the screen; returns it.
    fn wait_screen(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + SCREEN_TIMEOUT;
        loop {
            let screen = self.screen();
            if pred(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "the terminal never showed {what}:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_file(&self, name: &str) -> String {
        let deadline = Instant::now() + SCREEN_TIMEOUT;
        loop {
            if let Ok(text) = std::fs::read_to_string(self.file(name)) {
                if text.ends_with('\n') {
                    return text;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{name} was never written; screen:\n{}",
                self.screen()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn pane_size(&self) -> String {
        self.cmd(&[
            "display-message",
            "-p",
            "-t",
            "cli",
            "#{pane_height} #{pane_width}",
        ])
        .trim()
        .to_string()
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "cli"];
        args.extend_from_slice(keys);
        self.cmd(&args);
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-S")
            .arg(self.dir.path().join("socket"))
            .arg("kill-server")
            .output();
    }
}

/// Counts the lines of `screen` equal to `line` (trailing blanks ignored).
fn count_lines(screen: &str, line: &str) -> usize {
    screen.lines().filter(|l| l.trim_end() == line).count()
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_exec_tty_follows_the_terminal_in_tmux() {
    let env = TestEnv::new().await;
    cli(
        &env,
        &["sandbox", "create", &env.image_ref(), "--id", "cli-t"],
    )
    .ok();
    let tmux = Tmux::new();
    let dir = tmux.dir.path().display().to_string();
    let script = format!(
        "cd '{dir}'; stty -g > before; \
         '{BIN}' --server '{server}' exec -it cli-t -- sh; echo $? > rc; \
         stty -g > after; sleep 600",
        server = env.endpoint()
    );
    tmux.cmd(&[
        "new-session",
        "-d",
        "-s",
        "cli",
        "-x",
        "100",
        "-y",
        "30",
        &script,
    ]);
    tmux.wait_screen("a shell prompt", |s| s.contains("/ # "));

    // The remote terminal has the size of the local one.
    let size = tmux.pane_size();
    tmux.keys(&["stty size", "Enter"]);
    tmux.wait_screen(&format!("stty size = {size}"), |s| {
        count_lines(s, &size) == 1
    });

    // A resized window reaches the remote terminal (SIGWINCH -> resize).
    tmux.cmd(&["resize-window", "-t", "cli", "-x", "72", "-y", "20"]);
    let resized = tmux.pane_size();
    assert_ne!(resized, size, "tmux did not resize the window");
    tmux.keys(&["stty size", "Enter"]);
    tmux.wait_screen(&format!("stty size = {resized}"), |s| {
        count_lines(s, &resized) == 1
    });

    // Typed input reaches the process, and Ctrl-C is sent to it rather than to the client.
    tmux.keys(&["read line; echo got-$line", "Enter"]);
    tmux.keys(&["typed-by-hand", "Enter"]);
    tmux.wait_screen("the echoed input", |s| {
        count_lines(s, "got-typed-by-hand") == 1
    });
    tmux.keys(&["sleep 100", "Enter"]);
    std::thread::sleep(Duration::from_millis(500));
    tmux.keys(&["C-c"]);
    tmux.keys(&["echo interrupted-$?", "Enter"]);
    tmux.wait_screen("the interrupted sleep", |s| {
        count_lines(s, "interrupted-130") == 1
    });

    // The remote exit code comes back, and the local terminal is as it was before.
    tmux.keys(&["exit 7", "Enter"]);
    assert_eq!(tmux.wait_file("rc"), "7\n");
    let before = tmux.wait_file("before");
    assert_eq!(
        tmux.wait_file("after"),
        before,
        "the terminal was not restored"
    );

    cli(&env, &["sandbox", "rm", "-f", "cli-t"]).ok();
    drop(tmux);
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_snapshot_commit_ls_restore_export_rm() {
    let env = TestEnv::new().await;
    cli(
        &env,
        &["sandbox", "create", &env.image_ref(), "--id", "cli-s"],
    )
    .ok();
    cli(
        &env,
        &["exec", "cli-s", "--", "sh", "-c", "echo v1 > /state.txt"],
    )
    .ok();

    let snap = cli(&env, &["snapshot", "commit", "cli-s", "--label", "gen=1"]).ok();
    let snap = snap.trim().to_string();
    assert!(
        !snap.is_empty() && !snap.contains(char::is_whitespace),
        "{snap:?}"
    );

    let table = cli(&env, &["snapshot", "ls", "--sandbox", "cli-s"]).ok();
    let row = rows_of(&table, &snap);
    assert_eq!(row.len(), 1, "{table}");
    assert!(
        row[0].contains("cli-s") && row[0].ends_with("gen=1"),
        "{table}"
    );
    let listed = json(&cli(&env, &["snapshot", "ls", "-o", "json"]).ok());
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["snapshot_id"], snap.as_str());
    assert_eq!(listed[0]["sandbox_id"], "cli-s");
    assert_eq!(listed[0]["labels"]["gen"], "1");
    assert!(listed[0]["size_bytes"].as_i64().unwrap() > 0, "{listed:?}");
    let got = json(&cli(&env, &["snapshot", "get", &snap, "-o", "json"]).ok());
    assert_eq!(got["image"], env.image_ref().as_str());

    cli(
        &env,
        &["exec", "cli-s", "--", "sh", "-c", "echo v2 > /state.txt"],
    )
    .ok();
    assert_eq!(
        cli(&env, &["snapshot", "restore", "cli-s", &snap]).ok(),
        "cli-s\n"
    );
    assert_eq!(
        cli(&env, &["exec", "cli-s", "--", "cat", "/state.txt"]).ok(),
        "v1\n"
    );

    let target = format!("{}/cli-export:v1", env.registry.addr());
    let digest = cli(&env, &["snapshot", "export", &snap, &target]).ok();
    assert!(
        digest.starts_with("sha256:") && digest.trim().len() == 71,
        "{digest:?}"
    );

    // The restored sandbox builds on the snapshot, so it cannot go yet.
    let busy = cli(&env, &["snapshot", "rm", &snap]);
    assert_eq!(busy.code, Some(1), "{busy:?}");
    assert!(
        busy.stderr.starts_with("sandboxd: FAILED_PRECONDITION: "),
        "{busy:?}"
    );
    cli(&env, &["sandbox", "rm", "-f", "cli-s"]).ok();
    assert_eq!(
        cli(&env, &["snapshot", "rm", &snap]).ok(),
        format!("{snap}\n")
    );
    assert_eq!(cli(&env, &["snapshot", "ls"]).ok().lines().count(), 1);
    env.leak_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_image_pull_ls_rm_with_progress() {
    let env = TestEnv::new().await;
    let image = env.image_ref();

    // stderr is a pipe: one plain line per step, then the digest alone on stdout.
    let pulled = cli(&env, &["image", "pull", &image]);
    assert_eq!(pulled.code, Some(0), "{pulled:?}");
    let digest = pulled.stdout.trim().to_string();
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "{pulled:?}"
    );
    assert!(
        pulled.stderr.contains(&format!("{image}: resolving")),
        "{pulled:?}"
    );
    assert!(
        pulled.stderr.contains(&format!("{image}: pulled {digest}")),
        "{pulled:?}"
    );
    assert!(!pulled.stderr.contains('\r'), "{pulled:?}");

    let table = cli(&env, &["image", "ls"]).ok();
    let row = rows_of(&table, &image);
    assert_eq!(row.len(), 1, "{table}");
    assert!(row[0].contains(&digest[..19]), "{table}");
    let listed = json(&cli(&env, &["image", "ls", "-o", "json"]).ok());
    let entry = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == image.as_str())
        .expect("the pulled image is listed");
    assert_eq!(entry["digest"], digest.as_str());
    assert!(entry["size_bytes"].as_i64().unwrap() > 100_000, "{entry}");

    // On a terminal the progress is one redrawn bar. `script` gives the client a pty.
    let script = Command::new("script")
        .args(["-qefc"])
        .arg(format!(
            "'{BIN}' --server '{}' image pull '{image}'",
            env.endpoint()
        ))
        .arg("/dev/null")
        .stdin(Stdio::null())
        .output()
        .expect("run script");
    let screen = String::from_utf8_lossy(&script.stdout);
    assert!(script.status.success(), "{script:?}");
    assert!(screen.contains("\r\x1b[K"), "no redrawn line: {screen:?}");
    assert!(
        screen.contains(&format!("{image}: pulled {digest}")),
        "{screen:?}"
    );

    assert_eq!(
        cli(&env, &["image", "rm", &image]).ok(),
        format!("{image}\n")
    );
    assert!(rows_of(&cli(&env, &["image", "ls"]).ok(), &image).is_empty());
    let gone = cli(&env, &["image", "get", &image]);
    assert!(gone.stderr.starts_with("sandboxd: NOT_FOUND: "), "{gone:?}");
    env.leak_check().await;
}

fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_cp_copies_files_both_ways() {
    let env = TestEnv::new().await;
    cli(
        &env,
        &["sandbox", "create", &env.image_ref(), "--id", "cli-c"],
    )
    .ok();
    let local = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let src = local.path().join("tool.bin");
    std::fs::write(&src, &data).unwrap();
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o750)).unwrap();
    let src = src.to_str().unwrap();

    // Upload: same bytes, same mode.
    cli(&env, &["cp", src, "cli-c:/tmp/up.bin"]).ok();
    let remote = cli(&env, &["exec", "cli-c", "--", "sha256sum", "/tmp/up.bin"]).ok();
    assert_eq!(
        remote.split_whitespace().next(),
        Some(sha256(&data).as_str())
    );
    assert_eq!(
        cli(
            &env,
            &["exec", "cli-c", "--", "stat", "-c", "%a", "/tmp/up.bin"]
        )
        .ok(),
        "750\n"
    );
    // Into an existing directory: the file keeps its name.
    cli(&env, &["cp", src, "cli-c:/tmp"]).ok();
    cli(
        &env,
        &["exec", "cli-c", "--", "cmp", "/tmp/up.bin", "/tmp/tool.bin"],
    )
    .ok();

    // Download: same bytes, same mode.
    let down = local.path().join("down.bin");
    cli(&env, &["cp", "cli-c:/tmp/up.bin", down.to_str().unwrap()]).ok();
    assert!(
        std::fs::read(&down).unwrap() == data,
        "downloaded other bytes"
    );
    assert_eq!(mode_of(&down), 0o750);
    let into = local.path().join("into");
    std::fs::create_dir(&into).unwrap();
    cli(&env, &["cp", "cli-c:/etc/hostname", into.to_str().unwrap()]).ok();
    assert_eq!(
        std::fs::read_to_string(into.join("hostname")).unwrap(),
        "cli-c\n"
    );

    // stdin and stdout.
    cli_stdin(
        &env,
        &["cp", "-", "cli-c:/tmp/piped.txt"],
        b"through a pipe\n",
    )
    .ok();
    assert_eq!(
        cli(&env, &["cp", "cli-c:/tmp/piped.txt", "-"]).ok(),
        "through a pipe\n"
    );

    // Directories and impossible pairs are refused clearly.
    let dir = cli(&env, &["cp", "cli-c:/etc", into.to_str().unwrap()]);
    assert_eq!(dir.code, Some(1), "{dir:?}");
    assert!(dir.stderr.contains("is a directory"), "{dir:?}");
    let dir = cli(&env, &["cp", into.to_str().unwrap(), "cli-c:/tmp/x"]);
    assert_eq!(dir.code, Some(1), "{dir:?}");
    assert!(dir.stderr.contains("is a directory"), "{dir:?}");
    let both_local = cli(&env, &["cp", src, down.to_str().unwrap()]);
    assert_eq!(both_local.code, Some(2), "{both_local:?}");
    let missing = cli(&env, &["cp", "cli-c:/no/such/file", down.to_str().unwrap()]);
    assert!(
        missing.stderr.starts_with("sandboxd: NOT_FOUND: "),
        "{missing:?}"
    );
    // A failed download leaves the earlier file and no temporary file behind.
    assert!(std::fs::read(&down).unwrap() == data);
    let names: Vec<_> = std::fs::read_dir(local.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        !names.iter().any(|n| n.contains("sandboxd-cp")),
        "{names:?}"
    );

    cli(&env, &["sandbox", "rm", "-f", "cli-c"]).ok();
    env.leak_check().await;
}
