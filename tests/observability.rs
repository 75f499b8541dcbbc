//! Metrics scraped and parsed by a real Prometheus parser; traces received by a real OTLP
//! collector with the caller's trace id and parent.

mod common;

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::TestEnv;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use sandboxd::pb;
use sandboxd::pb::sandbox_service_client::SandboxServiceClient;
use sandboxd::pb::snapshot_service_client::SnapshotServiceClient;

fn scrape(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    body.to_string()
}

/// Parses exposition text with prometheus_client's OpenMetrics parser; returns "name{labels} value" lines.
/// One parsed sample: name, sorted labels, value.
type Sample = (String, Vec<(String, String)>, f64);

fn parse(text: &str) -> Vec<Sample> {
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.append([s.name, sorted(s.labels.items()), s.value])
print(json.dumps(out))
"#;
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 (run scripts/install-deps.sh)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser rejected the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, _, v)| *v)
        .sum()
}

/// What the metrics test's one exec reads on stdin (and writes back).
const EXEC_STDIN: &[u8] = b"12345\n";

#[tokio::test(flavor = "multi_thread")]
async fn metrics_are_valid_prometheus_and_counters_move() {
    let port = common::registry::free_port();
    let addr = format!("127.0.0.1:{port}");
    let env = TestEnv::with_args(&["--metrics-listen", &addr]).await;
    let ch = env.channel().await;
    let mut sb = SandboxServiceClient::new(ch.clone());
    let mut snap = SnapshotServiceClient::new(ch);
    let before = parse(&scrape(&addr));
    assert_eq!(value(&before, "sandboxd_containerd_up", &[]), 1.0);

    sb.create_sandbox(pb::CreateSandboxRequest {
        sandbox_id: "m".into(),
        image: env.image_ref(),
        ..Default::default()
    })
    .await
    .unwrap();
    // cat exits only once its stdin is closed, and sandboxd counts stdin before it writes and
    // closes it: the input is counted before the exit, whatever the scheduling. (With `echo`,
    // which ignores stdin, the exit could win and the input go uncounted.)
    let echoed = sb
        .exec_sync(pb::ExecSyncRequest {
            sandbox_id: "m".into(),
            args: vec!["cat".into()],
            stdin: EXEC_STDIN.to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        echoed.stdout, EXEC_STDIN,
        "cat returns its input: {echoed:?}"
    );
    let s = snap
        .commit_snapshot(pb::CommitSnapshotRequest {
            sandbox_id: "m".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    let restored = snap
        .restore_sandbox(pb::RestoreSandboxRequest {
            sandbox_id: "m".into(),
            snapshot_id: s.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert_eq!(restored.state(), pb::SandboxState::Running);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let now = sb
        .get_sandbox(pb::GetSandboxRequest {
            sandbox_id: "m".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert_eq!(
        now.state(),
        pb::SandboxState::Running,
        "{now:?}\n{}",
        env.sandboxd.log_tail()
    );
    let _ = sb
        .get_sandbox(pb::GetSandboxRequest {
            sandbox_id: "nope".into(),
        })
        .await
        .unwrap_err();

    let after = parse(&scrape(&addr));
    let create = "/sandboxd.v1.SandboxService/CreateSandbox";
    assert_eq!(
        value(
            &after,
            "sandboxd_rpc_requests_total",
            &[("method", create), ("code", "Ok")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &after,
            "sandboxd_rpc_requests_total",
            &[
                ("method", "/sandboxd.v1.SandboxService/GetSandbox"),
                ("code", "NotFound")
            ]
        ),
        1.0
    );
    assert_eq!(
        value(&after, "sandboxd_create_duration_seconds_count", &[]),
        1.0
    );
    assert!(value(&after, "sandboxd_create_duration_seconds_sum", &[]) > 0.0);
    assert_eq!(
        value(&after, "sandboxd_commit_duration_seconds_count", &[]),
        1.0
    );
    assert_eq!(
        value(&after, "sandboxd_restore_duration_seconds_count", &[]),
        1.0
    );
    assert!(value(&after, "sandboxd_exec_first_byte_seconds_count", &[]) >= 1.0);
    // The only exec of the test: its stdin in, the same bytes out.
    let exec_bytes = EXEC_STDIN.len() as f64;
    assert_eq!(
        value(&after, "sandboxd_exec_bytes_total", &[("direction", "in")]),
        exec_bytes
    );
    assert_eq!(
        value(&after, "sandboxd_exec_bytes_total", &[("direction", "out")]),
        exec_bytes
    );
    assert_eq!(
        value(&after, "sandboxd_sandboxes", &[("state", "running")]),
        1.0,
        "{after:?}"
    );
    assert_eq!(
        value(&after, "sandboxd_sandboxes", &[("state", "stopped")]),
        0.0
    );

    sb.delete_sandbox(pb::DeleteSandboxRequest {
        sandbox_id: "m".into(),
        force: true,
    })
    .await
    .unwrap();
    snap.delete_snapshot(pb::DeleteSnapshotRequest {
        snapshot_id: s.snapshot_id,
    })
    .await
    .unwrap();
    let last = parse(&scrape(&addr));
    assert_eq!(
        value(&last, "sandboxd_sandboxes", &[("state", "running")]),
        0.0
    );
    env.leak_check().await;
}

/// A minimal OTLP trace collector that keeps every span it is sent.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn traces_continue_the_callers_trace_with_containerd_children() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let env = TestEnv::with_args_env(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await;
    let mut sb = SandboxServiceClient::new(env.channel().await);
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let mut req = tonic::Request::new(pb::CreateSandboxRequest {
        sandbox_id: "traced".into(),
        image: env.image_ref(),
        ..Default::default()
    });
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{caller_span}-01").parse().unwrap(),
    );
    sb.create_sandbox(req).await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    let (rpc, children) = loop {
        {
            let spans = collector.0.lock().unwrap();
            let ours: Vec<&Span> = spans
                .iter()
                .filter(|s| hex::encode(&s.trace_id) == trace_id)
                .collect();
            if let Some(rpc) = ours.iter().find(|s| s.name.ends_with("CreateSandbox")) {
                let children: Vec<String> = ours
                    .iter()
                    .filter(|s| s.name == "containerd")
                    .map(|s| hex::encode(&s.span_id))
                    .collect();
                if !children.is_empty() {
                    break (
                        (*rpc).clone(),
                        ours.iter().map(|s| (*s).clone()).collect::<Vec<_>>(),
                    );
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "no CreateSandbox span with containerd children arrived in the caller's trace"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        hex::encode(&rpc.parent_span_id),
        caller_span,
        "the RPC span's parent is the caller's span"
    );
    // Every span of the trace descends from the RPC span.
    let ids: std::collections::HashMap<String, String> = children
        .iter()
        .map(|s| (hex::encode(&s.span_id), hex::encode(&s.parent_span_id)))
        .collect();
    let rpc_id = hex::encode(&rpc.span_id);
    for s in children.iter().filter(|s| s.name == "containerd") {
        let mut cur = hex::encode(&s.parent_span_id);
        let mut hops = 0;
        while cur != rpc_id {
            cur = ids.get(&cur).cloned().unwrap_or_else(|| {
                panic!(
                    "containerd span {} is not under the RPC span",
                    hex::encode(&s.span_id)
                )
            });
            hops += 1;
            assert!(hops < 16);
        }
    }
    sb.delete_sandbox(pb::DeleteSandboxRequest {
        sandbox_id: "traced".into(),
        force: true,
    })
    .await
    .unwrap();
    env.leak_check().await;
    server.abort();
}
