//! Randomised requests through every request conversion: whatever a client sends, the edge
//! answers with a value or a clear, bounded status, never a panic. A small deterministic
//! generator (the seed is in the failure message) keeps the test dependency-free and
//! repeatable.

use std::collections::HashMap;

use tonic::Status;

use super::*;
use crate::pb;
use crate::robust::Gen;

/// Cases per conversion.
const CASES: usize = 400;

/// Runs `check` on `CASES` generated inputs, naming the seed of a case that panics.
fn each_case(name: &str, check: impl Fn(&mut Gen) + std::panic::RefUnwindSafe) {
    crate::robust::each_case(name, CASES, 0x5eed_0000, check);
}

impl Gen {
    /// A string that is often hostile: empty, huge, NULs, `..`, separators, non-ASCII.
    fn string(&mut self) -> String {
        const PIECES: &[&str] = &[
            "",
            "a",
            "busybox",
            "/",
            "..",
            ".",
            "=",
            ",",
            ":",
            "\0",
            "é",
            "💥",
            "-",
            "_",
            " ",
            "sandboxd.io/",
            "containerd.io/",
            "localhost:5000/x",
            "@sha256:",
            "\n",
            "%2F",
            "snap-0001",
            "ABC",
            "0",
            "-1",
            "4294967295",
        ];
        match self.below(12) {
            0 => String::new(),
            1 => "x".repeat(self.below(20_000) as usize),
            _ => (0..self.below(8))
                .map(|_| PIECES[self.below(PIECES.len() as u64) as usize])
                .collect(),
        }
    }

    fn strings(&mut self) -> Vec<String> {
        (0..self.below(5)).map(|_| self.string()).collect()
    }

    fn map(&mut self) -> HashMap<String, String> {
        (0..self.below(4))
            .map(|_| (self.string(), self.string()))
            .collect()
    }

    fn i64(&mut self) -> i64 {
        match self.below(4) {
            0 => 0,
            1 => -(self.below(1000) as i64),
            2 => i64::MAX - self.below(3) as i64,
            _ => self.next() as i64,
        }
    }

    fn i32(&mut self) -> i32 {
        self.i64() as i32
    }

    fn u32(&mut self) -> u32 {
        self.next() as u32 >> self.below(32)
    }

    fn duration(&mut self) -> Option<prost_types::Duration> {
        (self.below(3) == 0).then(|| prost_types::Duration {
            seconds: self.i64(),
            nanos: self.i32(),
        })
    }
}

/// A refusal must be INVALID_ARGUMENT (these conversions see no state) and short.
fn assert_clear<T>(what: &str, r: crate::error::Result<T>) {
    if let Err(e) = r {
        let status = Status::from(e);
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{what}: {status:?}"
        );
        assert!(
            status.message().len() <= 1024,
            "{what}: {} bytes",
            status.message().len()
        );
    }
}

fn network(g: &mut Gen) -> Option<pb::NetworkSpec> {
    (g.below(2) == 0).then(|| pb::NetworkSpec {
        mode: g.i32() % 4,
        egress: (g.below(2) == 0).then(|| pb::EgressPolicy {
            mode: g.i32() % 5,
            allow: (0..g.below(3))
                .map(|_| pb::EgressRule {
                    cidr: g.string(),
                    ports: (0..g.below(3)).map(|_| g.u32()).collect(),
                    protocol: g.i32() % 4,
                })
                .collect(),
        }),
        ports: (0..g.below(3))
            .map(|_| pb::PortMapping {
                host_port: g.u32(),
                container_port: g.u32(),
                protocol: g.i32() % 4,
                host_ip: g.string(),
            })
            .collect(),
    })
}

#[test]
fn create_requests_never_panic() {
    each_case("create", |g| {
        let r = pb::CreateSandboxRequest {
            sandbox_id: g.string(),
            image: g.string(),
            snapshot_id: g.string(),
            command: g.strings(),
            env: g.map(),
            working_dir: g.string(),
            user: g.string(),
            hostname: g.string(),
            labels: g.map(),
            resources: (g.below(2) == 0).then(|| pb::Resources {
                cpu_millis: g.i64(),
                memory_bytes: g.i64(),
                pids_limit: g.i64(),
            }),
            network: network(g),
            start: (g.below(2) == 0).then(|| g.below(2) == 0),
            ttl: g.duration(),
            request_id: g.string(),
        };
        assert_clear("create", create_spec(r));
    });
}

#[test]
fn stop_and_exec_requests_never_panic() {
    each_case("stop", |g| {
        let r = pb::StopSandboxRequest {
            sandbox_id: g.string(),
            signal: g.i32(),
            timeout: g.duration(),
            force: g.below(2) == 0,
        };
        assert_clear("stop", stop_spec(r));
    });
    each_case("exec_sync", |g| {
        let r = pb::ExecSyncRequest {
            sandbox_id: g.string(),
            args: g.strings(),
            env: g.map(),
            working_dir: g.string(),
            user: g.string(),
            stdin: g.string().into_bytes(),
            timeout: g.duration(),
            max_output_bytes: g.i64(),
        };
        assert_clear("exec_sync", exec_sync_spec(r));
    });
}

#[test]
fn file_requests_never_panic() {
    each_case("files", |g| {
        assert_clear(
            "read",
            read_file_spec(pb::ReadFileRequest {
                sandbox_id: g.string(),
                path: g.string(),
                offset: g.i64(),
                length: g.i64(),
            }),
        );
        assert_clear(
            "list",
            list_files_spec(pb::ListFilesRequest {
                sandbox_id: g.string(),
                path: g.string(),
                depth: g.i32(),
            }),
        );
        assert_clear(
            "mkdir",
            make_directory_spec(pb::MakeDirectoryRequest {
                sandbox_id: g.string(),
                path: g.string(),
                mode: g.u32(),
                parents: g.below(2) == 0,
            }),
        );
        assert_clear(
            "remove",
            remove_path_spec(pb::RemovePathRequest {
                sandbox_id: g.string(),
                path: g.string(),
                recursive: g.below(2) == 0,
            }),
        );
    });
}
